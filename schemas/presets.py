"""Quality presets, sampling solvers and output sizes: the knobs a job may turn.

Owns the preset table and the allowed sizes. Must never do I/O.
"""

from __future__ import annotations

from ._base import Message, StrEnum


class QualityPreset(StrEnum):
    """Named sampling settings. `custom` takes steps and guidance from the job itself.
    `turbo` is for step- and guidance-distilled weights: only nodes that load such weights
    (DISTILLED) serve it, and they serve nothing else."""

    FAST = "fast"
    BALANCED = "balanced"
    HIGH = "high"
    CUSTOM = "custom"
    TURBO = "turbo"


class SampleSolver(StrEnum):
    """Flow-matching solver. `dpmpp` is accepted as a spelling of `dpm++`. `euler` is plain
    flow-matching Euler over the timesteps step-distilled weights are trained on."""

    UNIPC = "unipc"
    DPMPP = "dpm++"
    EULER = "euler"

    @classmethod
    def _missing_(cls, value: object) -> SampleSolver | None:
        if isinstance(value, str) and value.strip().lower() in {"dpmpp", "dpm_pp", "dpm-pp"}:
            return cls.DPMPP
        return None


class ImageSize(StrEnum):
    """Output size as `width*height`. The model was trained at 1280*720 / 720*1280 and 480p."""

    LANDSCAPE_720P = "1280*720"
    PORTRAIT_720P = "720*1280"
    LANDSCAPE_480P = "832*480"
    PORTRAIT_480P = "480*832"
    PREVIEW_576P = "1024*576"
    FULL_HD_1080P = "1920*1080"

    @property
    def width(self) -> int:
        return int(self.value.split("*")[0])

    @property
    def height(self) -> int:
        return int(self.value.split("*")[1])

    @property
    def trained(self) -> bool:
        """False for sizes outside the model's training set: they work, with weaker results."""
        return self not in {ImageSize.PREVIEW_576P, ImageSize.FULL_HD_1080P}


class PresetParams(Message):
    """The sampling settings a preset stands for."""

    infer_steps: int
    guidance_scale: float
    sample_solver: SampleSolver


PRESETS: dict[QualityPreset, PresetParams] = {
    QualityPreset.FAST: PresetParams(
        infer_steps=20, guidance_scale=2.5, sample_solver=SampleSolver.UNIPC
    ),
    QualityPreset.BALANCED: PresetParams(
        infer_steps=30, guidance_scale=3.0, sample_solver=SampleSolver.UNIPC
    ),
    QualityPreset.HIGH: PresetParams(
        infer_steps=50, guidance_scale=4.0, sample_solver=SampleSolver.DPMPP
    ),
    # LightX2V's Wan2.1 I2V step/CFG distill LoRAs: 4 steps at timesteps 1000, 750, 500,
    # 250 (before the shift of 5), no classifier-free guidance.
    QualityPreset.TURBO: PresetParams(
        infer_steps=4, guidance_scale=1.0, sample_solver=SampleSolver.EULER
    ),
}
"""Settings per named preset; `custom` has none (the job must give them)."""

DISTILLED_PRESETS: frozenset[QualityPreset] = frozenset({QualityPreset.TURBO})
"""Presets only a node with step/CFG-distilled weights (DISTILLED) serves; such a node
serves only these, since the undistilled presets' many steps and guidance suit it badly."""


def served_presets(distilled: bool) -> list[QualityPreset]:
    """The presets a node serves: the distilled ones on a DISTILLED node, else the rest."""
    return [p for p in QualityPreset if (p in DISTILLED_PRESETS) == distilled]


DEFAULT_SAMPLE_SHIFT = 5.0
"""Flow-matching shift used for 720p by the reference implementation."""

DEFAULT_FPS = 16
"""The model's native frame rate."""

DEFAULT_NUM_FRAMES = 81
MIN_NUM_FRAMES = 5
MAX_NUM_FRAMES = 121
