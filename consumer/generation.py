"""From a validated `JobRequest` to the engine's `GenerationRequest`.

Owns the mapping of job fields (preset, size, frames, cache, seed) to engine parameters,
the same for the worker and for `i2v generate`, and which presets a node's weights serve.
Must never fetch or decode anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from i2v_fleet.pipeline.request import (
    AttentionCacheSpec,
    CacheSpec,
    FirstBlockCacheSpec,
    GenerationRequest,
    Solver,
)
from i2v_fleet.schemas import (
    DISTILLED_PRESETS,
    AttentionCache,
    FirstBlockCache,
    JobRequest,
    NoCache,
    SampleSolver,
    served_presets,
)

from .errors import PresetUnavailable

if TYPE_CHECKING:
    from PIL import Image


def cache_spec(job: JobRequest, node_default: CacheSpec | None) -> CacheSpec | None:
    """The job's cache, or the node's default (USE_ATTENTION_CACHE) when it names none."""
    cache = job.cache
    if cache is None:
        return node_default
    if isinstance(cache, NoCache):
        return None
    if isinstance(cache, AttentionCache):
        return AttentionCacheSpec(cache.start_step, cache.interval, cache.end_step)
    if isinstance(cache, FirstBlockCache):
        return FirstBlockCacheSpec(cache.threshold)
    raise TypeError(f"unsupported cache {cache!r}")  # pragma: no cover - schema refuses


def check_preset(job: JobRequest, *, distilled: bool) -> None:
    """`PresetUnavailable` unless a node with (DISTILLED) or without distilled weights
    serves the job's quality_preset; the message names the preset and what serves it."""
    preset = job.quality_preset
    if preset in served_presets(distilled):
        return
    names = ", ".join(p.value for p in served_presets(distilled))
    if preset in DISTILLED_PRESETS:
        raise PresetUnavailable(
            f"quality_preset {preset.value!r} runs only on nodes with step/CFG-distilled "
            f"weights (DISTILLED=true); this node serves {names}. Submit it to the topic "
            "of a turbo pool"
        )
    raise PresetUnavailable(
        f"quality_preset {preset.value!r} needs undistilled weights; this node has "
        f"distilled weights (DISTILLED=true) and serves only {names}. Submit it to the "
        "topic of a standard pool"
    )


_SOLVERS: dict[SampleSolver, Solver] = {
    SampleSolver.UNIPC: "unipc",
    SampleSolver.DPMPP: "dpm++",
    SampleSolver.EULER: "euler",
}


def generation_request(
    job: JobRequest, image: Image.Image, *, node_cache: CacheSpec | None = None
) -> GenerationRequest:
    """The engine request for `job`, with `image` already prepared at the job's size."""
    sampling = job.sampling()
    return GenerationRequest(
        image=image,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        width=job.image_size.width,
        height=job.image_size.height,
        num_frames=job.num_frames,
        infer_steps=sampling.infer_steps,
        guidance_scale=sampling.guidance_scale,
        solver=_SOLVERS[sampling.sample_solver],
        shift=sampling.sample_shift,
        seed=job.seed,
        cache=cache_spec(job, node_cache),
    )
