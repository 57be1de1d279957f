"""The generation engine: Wan2.1 I2V over diffusers components and torch.

Imports nothing of ours and knows nothing of Kafka or MinIO: it takes a typed
`GenerationRequest` plus `on_progress` / `should_stop` callables and returns frames.
Names load lazily, so `import i2v_fleet.pipeline.cli` (the `i2v` commands) does not import torch.

    engine = WanI2V.load(MODEL_CKPT_DIR)
    image = prepare_image(jpeg_bytes, 832, 480)
    outcome = engine.generate(GenerationRequest(image=image, prompt="...", width=832,
                                                height=480, num_frames=41))
    if isinstance(outcome, Generated):
        encode_mp4(outcome.frames, "video.mp4", fps=16)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .caches import attention_reuse_schedule
    from .devices import DeviceInfo, detect_kind, list_devices
    from .engine import WanI2V, make_scheduler
    from .errors import (
        BackendUnavailable,
        CompileFailed,
        ImageInvalid,
        InvalidRequest,
        ModelLoadError,
        OutOfMemory,
        PipelineError,
        VideoEncodingError,
    )
    from .images import ImageLimits, prepare_image
    from .loading import check_checkpoint
    from .request import (
        AttentionCacheSpec,
        FirstBlockCacheSpec,
        Generated,
        GenerationRequest,
        Outcome,
        Stopped,
    )
    from .tiny import write_tiny_model
    from .video import VideoInfo, encode_mp4, probe_mp4, write_poster

_EXPORTS = {
    "AttentionCacheSpec": "request",
    "BackendUnavailable": "errors",
    "CompileFailed": "errors",
    "DeviceInfo": "devices",
    "FirstBlockCacheSpec": "request",
    "Generated": "request",
    "GenerationRequest": "request",
    "ImageInvalid": "errors",
    "ImageLimits": "images",
    "InvalidRequest": "errors",
    "ModelLoadError": "errors",
    "OutOfMemory": "errors",
    "Outcome": "request",
    "PipelineError": "errors",
    "Stopped": "request",
    "VideoEncodingError": "errors",
    "VideoInfo": "video",
    "WanI2V": "engine",
    "attention_reuse_schedule": "caches",
    "check_checkpoint": "loading",
    "detect_kind": "devices",
    "encode_mp4": "video",
    "list_devices": "devices",
    "make_scheduler": "engine",
    "prepare_image": "images",
    "probe_mp4": "video",
    "write_poster": "video",
    "write_tiny_model": "tiny",
}

__all__ = [
    "AttentionCacheSpec",
    "BackendUnavailable",
    "CompileFailed",
    "DeviceInfo",
    "FirstBlockCacheSpec",
    "Generated",
    "GenerationRequest",
    "ImageInvalid",
    "ImageLimits",
    "InvalidRequest",
    "ModelLoadError",
    "OutOfMemory",
    "Outcome",
    "PipelineError",
    "Stopped",
    "VideoEncodingError",
    "VideoInfo",
    "WanI2V",
    "attention_reuse_schedule",
    "check_checkpoint",
    "detect_kind",
    "encode_mp4",
    "list_devices",
    "make_scheduler",
    "prepare_image",
    "probe_mp4",
    "write_poster",
    "write_tiny_model",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'i2v_fleet.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
