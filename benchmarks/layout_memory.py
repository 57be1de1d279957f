"""Per-card weight memory of Wan2.1-I2V-14B-720P for each node layout, computed.

Builds the published configurations of the four parts on the meta device (no memory, no
download) to count their parameters, then applies pipeline.layout's placement rules:
DiT and T5 in bf16 (sharded with DIT_FSDP / T5_FSDP), CLIP and VAE in fp32 on every rank,
T5 off the cards with T5_CPU. Weights only: activations, the attention workspace and the
allocator's slack come on top.

    python benchmarks/layout_memory.py [--out benchmarks/results/layout_memory.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2v_fleet.pipeline.layout import ModelSizes, ParallelLayout, weight_bytes_per_card

# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers
TRANSFORMER_14B = {
    "added_kv_proj_dim": 5120,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": 1280,
    "in_channels": 36,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
# UMT5-XXL encoder (text_encoder/config.json)
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}
# CLIP ViT-H/14 vision tower (image_encoder/config.json)
CLIP_VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
}

LAYOUTS = {
    "1 card": ParallelLayout(nproc=1),
    "8 cards, Ulysses 8": ParallelLayout(nproc=8, ulysses_size=8),
    "8 cards, Ulysses 8, DIT_FSDP (seed default)": ParallelLayout(
        nproc=8, ulysses_size=8, dit_fsdp=True
    ),
    "8 cards, Ulysses 8, DIT_FSDP, T5_FSDP": ParallelLayout(
        nproc=8, ulysses_size=8, dit_fsdp=True, t5_fsdp=True
    ),
    "8 cards, Ulysses 8, DIT_FSDP, T5_CPU": ParallelLayout(
        nproc=8, ulysses_size=8, dit_fsdp=True, t5_cpu=True
    ),
    "8 cards, CFG 2 x Ulysses 4, DIT_FSDP, T5_CPU": ParallelLayout(
        nproc=8, ulysses_size=4, cfg_size=2, dit_fsdp=True, t5_cpu=True
    ),
    "4 cards (LANES=2), Ulysses 4, DIT_FSDP, T5_CPU": ParallelLayout(
        nproc=4, ulysses_size=4, dit_fsdp=True, t5_cpu=True
    ),
    "2 cards (LANES=4), Ulysses 2, DIT_FSDP, T5_CPU": ParallelLayout(
        nproc=2, ulysses_size=2, dit_fsdp=True, t5_cpu=True
    ),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes_14b() -> ModelSizes:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        return ModelSizes(
            transformer=count(WanTransformer3DModel(**TRANSFORMER_14B)),
            text_encoder=count(UMT5EncoderModel(UMT5Config(**UMT5_XXL))),
            image_encoder=count(CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))),
            vae=count(AutoencoderKLWan()),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    sizes = sizes_14b()
    gib = 1024**3
    lines = [
        "Wan2.1-I2V-14B-720P parameters: "
        f"transformer {sizes.transformer / 1e9:.2f} B, "
        f"text encoder {sizes.text_encoder / 1e9:.2f} B, "
        f"image encoder {sizes.image_encoder / 1e9:.3f} B, VAE {sizes.vae / 1e6:.0f} M",
        "",
        f"{'layout (busiest card, weights only, GiB)':<56}"
        + "".join(f"{h:>7}" for h in ("DiT", "T5", "CLIP", "VAE"))
        + f"{'total':>8}",
    ]
    for name, layout in LAYOUTS.items():
        layout.check(TRANSFORMER_14B["num_attention_heads"])  # type: ignore[arg-type]
        per = weight_bytes_per_card(layout, sizes)
        lines.append(
            f"{name:<56}"
            + "".join(
                f"{per[k] / gib:>7.2f}"
                for k in ("transformer", "text_encoder", "image_encoder", "vae")
            )
            + f"{sum(per.values()) / gib:>8.2f}"
        )
    lines.append("")
    lines.append(
        "T5_CPU puts the text encoder in rank 0's host memory instead "
        f"({sizes.text_encoder * 2 / gib:.2f} GiB in bf16)."
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
