"""From a validated `JobRequest` to the engine's `GenerationRequest`.

Owns the mapping of job fields (preset, size, frames, cache, seed) to engine parameters,
the same for the worker and for `i2v generate`. Must never fetch or decode anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.request import AttentionCacheSpec, CacheSpec, FirstBlockCacheSpec, GenerationRequest
from schemas import AttentionCache, FirstBlockCache, JobRequest, NoCache

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
        solver="dpm++" if sampling.sample_solver.value == "dpm++" else "unipc",
        shift=sampling.sample_shift,
        seed=job.seed,
        cache=cache_spec(job, node_cache),
    )
