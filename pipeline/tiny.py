"""A tiny Wan2.1 I2V with seeded random weights, saved in the real checkpoint's layout.

Owns the tiny model that tests and the demo load through exactly the same path as
Wan-AI/Wan2.1-I2V-14B-720P-Diffusers. Must never download anything: the tokenizer is
trained here, in code, on a built-in corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Words the tokenizer learns from; prompts outside it still encode (as pieces or <unk>).
_CORPUS = """
a cat walks along a sunlit windowsill while the camera slowly pans to the right
a paper boat drifts down a rain soaked street with reflections shimmering in puddles
a lighthouse stands in a storm as waves crash against the rocks below at night
an astronaut floats above the earth and waves at the camera in slow motion
a red fox runs through fresh snow in a quiet forest at sunrise
the city skyline at dusk with lights turning on one by one time lapse
a woman in a yellow coat turns her head and smiles, wind in her hair
close up of coffee being poured into a white cup, steam rising, warm light
a dog catches a frisbee on the beach, splashing water, golden hour
drone shot over green mountains and a winding river, clouds moving fast
blurry, low quality, watermark, static, overexposed, worst quality, jpeg artifacts
ugly, deformed, extra fingers, poorly drawn hands, poorly drawn face, still picture
bright colors, messy background, three legs, many people in the background
walking backwards, subtitles, style, works, paintings, images, overall gray
""".strip()

TINY_TEXT_DIM = 32
TINY_IMAGE_DIM = 16
TINY_HEADS = 2
TINY_HEAD_DIM = 16


def build_tokenizer() -> object:
    """A real Unigram tokenizer with T5's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )


def tiny_vae(seed: int = 0) -> Any:
    """The tiny model's AutoencoderKLWan (z_dim 16, 8x spatial / 4x temporal), seeded."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed + 2)
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def write_tiny_model(
    out: str | Path, seed: int = 0, transformer: dict[str, Any] | None = None
) -> Path:
    """Write a tiny Wan I2V to `out` (diffusers layout, safetensors) and return the path.
    `transformer` overrides the DiT's config (e.g. a wider, deeper one for benchmarks; keep
    `added_kv_proj_dim` = heads x head dim)."""
    import torch
    from diffusers import (
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    out = Path(out)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)  # type: ignore[arg-type]

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab,
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=TINY_IMAGE_DIM,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    vae = tiny_vae(seed)
    torch.manual_seed(seed + 3)
    dit = WanTransformer3DModel(
        **{
            "patch_size": (1, 2, 2),
            "num_attention_heads": TINY_HEADS,
            "attention_head_dim": TINY_HEAD_DIM,
            "in_channels": 36,
            "out_channels": 16,
            "text_dim": TINY_TEXT_DIM,
            "freq_dim": 32,
            "ffn_dim": 64,
            "num_layers": 4,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "image_dim": TINY_IMAGE_DIM,
            "added_kv_proj_dim": TINY_HEADS * TINY_HEAD_DIM,
            "rope_max_seq_len": 1024,
            **(transformer or {}),
        }
    )
    # The 720P checkpoint's scheduler: UniPC over flow-matching sigmas, shift 5.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=5.0,
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=dit,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    (out / "TINY_MODEL.json").write_text(
        json.dumps({"seed": seed, "note": "random weights: output is noise-like"}) + "\n"
    )
    return out
