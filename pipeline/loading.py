"""Load Wan2.1 I2V from MODEL_CKPT_DIR in the diffusers layout, safetensors only.

Owns checking the directory (every part present, no pickled weights), placing each
component on its device and dtype, and calling in MODEL_LORAS (pipeline.lora) to be fused
into the transformer as it loads. Must never unpickle: pickled weights are refused
before any loader sees the directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .devices import DeviceKind, default_dtype, detect_kind
from .errors import ModelLoadError
from .lora import LoraSpec, LoraWeights, fuse, read_loras

log = logging.getLogger(__name__)

WEIGHT_PARTS = ("transformer", "vae", "text_encoder", "image_encoder")
"""Subfolders that hold weights (`*.safetensors`, possibly sharded with an index)."""

CONFIG_PARTS = {
    "tokenizer": ("tokenizer_config.json",),
    "image_processor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
}
"""Subfolders that hold only configuration, with the file each must contain."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class WanComponents:
    """The loaded parts of the model, placed on their devices."""

    tokenizer: Any
    text_encoder: Any
    image_processor: Any
    image_encoder: Any
    vae: Any
    transformer: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    text_device: torch.device
    path: Path


def check_checkpoint(path: str | Path) -> Path:
    """Raise `ModelLoadError` naming the first missing part or pickled file; return the path."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(
            f"MODEL_CKPT_DIR {root} is not a directory; point it at a download of "
            "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers (or run `i2v model tiny --out DIR`)"
        )
    for part in WEIGHT_PARTS:
        folder = root / part
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL_CKPT_DIR {root} has no {part}/ folder")
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelLoadError(
                f"{folder} holds pickled weights ({', '.join(pickled)}); only safetensors "
                "are loaded, because unpickling can run code. Convert them to safetensors "
                "and remove the pickled files"
            )
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} has no *.safetensors weights")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no config.json")
    for part, files in CONFIG_PARTS.items():
        for name in files:
            if not (root / part / name).is_file():
                raise ModelLoadError(f"MODEL_CKPT_DIR {root} is missing {part}/{name}")
    return root


def load_components(
    path: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    t5_cpu: bool = False,
    ranks: Any = None,
    layout: Any = None,
    loras: Sequence[LoraSpec] = (),
) -> WanComponents:
    """Load every component once. The VAE and CLIP stay in fp32, as the reference does.

    On several ranks (`ranks`, `layout`: pipeline.parallel.Ranks and layout.ParallelLayout)
    DIT_FSDP / T5_FSDP shard the transformer / text encoder across the ranks as they load,
    and T5_CPU loads the text encoder on rank 0 only (the others get None). `loras`
    (MODEL_LORAS) are fused into the transformer's weights as it loads (pipeline.lora)."""
    import json

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    root = check_checkpoint(path)
    adapters = read_loras(loras)  # before the big reads: a bad adapter fails fast
    kind: DeviceKind = detect_kind(device.split(":")[0] if device else None)
    dtype = dtype or default_dtype(kind)
    if device and ":" in device:  # a rank's own card, e.g. cuda:3
        target = torch.device(device)
    else:
        target = torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")
    text_device = torch.device("cpu") if t5_cpu else target
    distributed = ranks is not None and ranks.distributed
    shard_dit = distributed and layout is not None and layout.dit_fsdp
    shard_t5 = distributed and layout is not None and layout.t5_fsdp and not t5_cpu
    skip_t5 = distributed and t5_cpu and ranks.rank != 0
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(root / "tokenizer")
        image_processor: Any = CLIPImageProcessor.from_pretrained(root / "image_processor")
        text_encoder = (
            None
            if skip_t5
            else _sharded(UMT5EncoderModel, root / "text_encoder", dtype, text_device, "t5")
            if shard_t5
            else _weights(UMT5EncoderModel, root / "text_encoder", dtype, text_device)
        )
        image_encoder = _weights(CLIPVisionModel, root / "image_encoder", torch.float32, target)
        vae = _weights(AutoencoderKLWan, root / "vae", torch.float32, target)
        transformer = (
            _sharded(WanTransformer3DModel, root / "transformer", dtype, target, "dit", adapters)
            if shard_dit
            else _weights(WanTransformer3DModel, root / "transformer", dtype, target)
        )
        if adapters and not shard_dit:
            fuse(transformer, adapters)
        scheduler_config = json.loads(  # noqa: TID251 - a config file, not a message
            (root / "scheduler" / "scheduler_config.json").read_text()
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the model from {root}: {exc}") from exc
    for module in (text_encoder, image_encoder, vae, transformer):
        if module is not None:
            module.eval().requires_grad_(False)
    log.info("loaded %s on %s (%s), text encoder on %s", root, target, dtype, text_device)
    return WanComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        image_processor=image_processor,
        image_encoder=image_encoder,
        vae=vae,
        transformer=transformer,
        scheduler_config=scheduler_config,
        device=target,
        dtype=dtype,
        text_device=text_device,
        path=root,
    )


def _weights(cls: Any, folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """One weight-bearing component, from safetensors only, on its device and dtype."""
    return cls.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device)


def _sharded(
    cls: Any,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    part: str,
    adapters: LoraWeights | None = None,
) -> Any:
    """One component sharded across the ranks with FSDP2 as it loads (no full copy)."""
    from . import sharding

    units = sharding.transformer_units if part == "dit" else sharding.text_encoder_units
    return sharding.load_sharded(
        cls, folder, dtype=dtype, device=device, units=units, loras=adapters
    )
