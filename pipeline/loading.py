"""Load Wan2.1 I2V from MODEL_CKPT_DIR in the diffusers layout, safetensors only.

Owns placing each component on its device and dtype, choosing whole or FSDP-sharded loading
(pipeline.sharding), and calling in MODEL_LORAS (pipeline.lora) to be fused into the
transformer as it loads. Must never unpickle: the directory is checked (pipeline.checkpoint:
every part present, no pickled weights) before any loader sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_checkpoint, read_json
from .devices import DeviceKind, default_dtype, detect_kind
from .errors import ModelLoadError
from .lora import LoraSpec, LoraWeights, fuse, read_loras
from .sharding import load_sharded, text_encoder_units, transformer_units

__all__ = ["WanComponents", "check_checkpoint", "load_components"]

log = logging.getLogger(__name__)


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
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
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
    units = transformer_units if part == "dit" else text_encoder_units
    return load_sharded(cls, folder, dtype=dtype, device=device, units=units, loras=adapters)
