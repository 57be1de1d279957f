"""What the engine is asked to make, and what it hands back.

Owns `GenerationRequest` and its checks (a wall of explicit errors that name the bad
value), the cache specs, and the two outcomes: `Generated` frames or `Stopped` early.
Must never know where a request came from (no Kafka, no job schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from PIL import Image

Solver = Literal["unipc", "dpm++", "euler"]
SOLVERS: tuple[Solver, ...] = ("unipc", "dpm++", "euler")

# The phases the engine reports through `on_progress`, in order.
ENCODING_PROMPT = "encoding_prompt"
DENOISING = "denoising"
DECODING = "decoding"

# Wan2.1's own default negative prompt (its sample_neg_prompt), used when a job gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ProgressCallback(Protocol):
    def __call__(self, phase: str, step: int, total: int) -> None: ...


class StopCallback(Protocol):
    def __call__(self) -> bool: ...


class FramesCallback(Protocol):
    """Receives decoded frames in order as uint8 arrays shaped (f, H, W, 3)."""

    def __call__(self, frames: Any) -> None: ...


@dataclass(frozen=True)
class AttentionCacheSpec:
    """Reuse each block's self-attention output on steps in (start, end] off the interval."""

    start_step: int = 12
    interval: int = 4
    end_step: int = 37


@dataclass(frozen=True)
class FirstBlockCacheSpec:
    """diffusers' first-block cache: skip the other blocks while block 0 barely changes."""

    threshold: float = 0.05


CacheSpec = AttentionCacheSpec | FirstBlockCacheSpec


@dataclass(frozen=True)
class GenerationRequest:
    """One video to generate. `image` is already prepared: RGB, exactly width x height."""

    image: Image.Image
    prompt: str
    width: int
    height: int
    num_frames: int = 81
    infer_steps: int = 30
    guidance_scale: float = 3.0
    solver: Solver = "unipc"
    shift: float = 5.0
    seed: int | None = None
    negative_prompt: str = ""
    cache: CacheSpec | None = None
    max_sequence_length: int = 512

    def check(self, spatial_multiple: int = 16, temporal_factor: int = 4) -> None:
        """Refuse anything the model cannot run, naming the value and what would work."""
        if not self.prompt.strip():
            raise InvalidRequest("prompt must not be empty")
        if self.width <= 0 or self.height <= 0:
            raise InvalidRequest(
                f"width and height must be positive; got {self.width}x{self.height}"
            )
        if self.width % spatial_multiple or self.height % spatial_multiple:
            raise InvalidRequest(
                f"width and height must be multiples of {spatial_multiple}; "
                f"got {self.width}x{self.height}"
            )
        if self.image.size != (self.width, self.height) or self.image.mode != "RGB":
            raise InvalidRequest(
                f"image must be RGB {self.width}x{self.height} (prepare it with "
                f"pipeline.prepare_image); got {self.image.mode} "
                f"{self.image.size[0]}x{self.image.size[1]}"
            )
        if self.num_frames < 1 or (self.num_frames - 1) % temporal_factor:
            raise InvalidRequest(
                f"num_frames must be {temporal_factor}n+1 (5, 9, ..., 81, ...); "
                f"got {self.num_frames}"
            )
        if not 1 <= self.infer_steps <= 1000:
            raise InvalidRequest(f"infer_steps must be between 1 and 1000; got {self.infer_steps}")
        if not self.guidance_scale >= 1.0:
            raise InvalidRequest(f"guidance_scale must be at least 1.0; got {self.guidance_scale}")
        if self.solver not in SOLVERS:
            raise InvalidRequest(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}")
        if not self.shift > 0:
            raise InvalidRequest(f"shift must be positive; got {self.shift}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be between 0 and 2**63-1; got {self.seed}")
        cache = self.cache
        if isinstance(cache, AttentionCacheSpec) and (
            cache.interval < 1 or cache.start_step < 0 or cache.start_step >= cache.end_step
        ):
            raise InvalidRequest(
                "attention cache needs interval >= 1 and 0 <= start_step < end_step; got "
                f"start {cache.start_step}, interval {cache.interval}, end {cache.end_step}"
            )
        if isinstance(cache, FirstBlockCacheSpec) and not 0 < cache.threshold <= 1:
            raise InvalidRequest(
                f"first-block cache threshold must be in (0, 1]; got {cache.threshold}"
            )

    @property
    def do_guidance(self) -> bool:
        """Classifier-free guidance runs the uncond branch only when it changes the result."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Generated:
    """The frames of a finished generation, uint8 RGB, shape (num_frames, height, width, 3)."""

    frames: NDArray[np.uint8]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_steps: int = 0
    """Denoising steps on which a cache skipped work (attention cache: reused steps)."""


@dataclass(frozen=True)
class Stopped:
    """The generation stopped before the end because `should_stop()` said so; no frames."""

    step: int
    """Denoising steps completed before the stop."""
    total_steps: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


Outcome = Generated | Stopped
