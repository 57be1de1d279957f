"""Step caches: the attention cache's exact schedule, real savings, and no state leaks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from i2v_fleet.pipeline import (
    AttentionCacheSpec,
    FirstBlockCacheSpec,
    Generated,
    GenerationRequest,
    Stopped,
    WanI2V,
    attention_reuse_schedule,
)


def _request(image: Image.Image, **overrides: object) -> GenerationRequest:
    base = GenerationRequest(
        image=image,
        prompt="a dog runs",
        width=96,
        height=64,
        num_frames=5,
        infer_steps=10,
        guidance_scale=3.0,
        seed=3,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def _frames(outcome: object) -> np.ndarray:
    assert isinstance(outcome, Generated)
    return outcome.frames


def test_seed_default_schedule_reuses_19_of_40_steps() -> None:
    """12/4/37 at 40 steps reuses exactly the 19 steps the Ascend port skips."""
    reuse = attention_reuse_schedule(AttentionCacheSpec(12, 4, 37), 40)
    assert sum(reuse) == 19
    assert [i for i, r in enumerate(reuse) if r] == [
        13,
        14,
        15,
        17,
        18,
        19,
        21,
        22,
        23,
        25,
        26,
        27,
        29,
        30,
        31,
        33,
        34,
        35,
        37,
    ]


@pytest.mark.parametrize(("start", "interval", "end", "steps"), [(2, 3, 8, 10), (0, 1, 5, 10)])
def test_schedule_edges(start: int, interval: int, end: int, steps: int) -> None:
    """The start step and every interval boundary recompute; interval 1 never reuses."""
    reuse = attention_reuse_schedule(AttentionCacheSpec(start, interval, end), steps)
    assert not reuse[start]
    for i in range(start + interval, min(end, steps - 1) + 1, interval):
        assert not reuse[i]
    if interval == 1:
        assert not any(reuse)


def test_attention_cache_skips_self_attention_on_reuse_steps(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """With the cache, self-attention is computed only off the reuse steps, per block and branch."""
    calls = {"n": 0}
    blocks = engine.c.transformer.blocks
    originals = [b.attn1.processor for b in blocks]

    def counting(inner: object) -> object:
        def processor(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            return inner(*args, **kwargs)  # type: ignore[operator]

        return processor

    for block, original in zip(blocks, originals, strict=True):
        block.attn1.set_processor(counting(original))
    try:
        spec = AttentionCacheSpec(start_step=2, interval=3, end_step=8)
        outcome = engine.generate(_request(small_image, cache=spec))
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.attn1.set_processor(original)
    reused = sum(attention_reuse_schedule(spec, 10))
    assert isinstance(outcome, Generated)
    assert outcome.cached_steps == reused == 4
    assert calls["n"] == (10 - reused) * 2 * len(blocks)


def test_attention_cache_changes_work_not_shape(engine: WanI2V, small_image: Image.Image) -> None:
    """A cached run differs from the exact one but stays a sound video of the same shape."""
    exact = _frames(engine.generate(_request(small_image)))
    cached = _frames(engine.generate(_request(small_image, cache=AttentionCacheSpec(2, 3, 8))))
    assert cached.shape == exact.shape
    assert not np.array_equal(cached, exact)
    assert np.abs(cached.astype(int) - exact.astype(int)).mean() < 40


@pytest.mark.parametrize(
    "spec", [AttentionCacheSpec(2, 3, 8), FirstBlockCacheSpec(threshold=0.2)], ids=str
)
def test_cache_off_after_a_cached_or_stopped_job_equals_the_uncached_run(
    engine: WanI2V, small_image: Image.Image, spec: object
) -> None:
    """No cache state survives a job, even one stopped midway: the next run is exact again."""
    baseline = _frames(engine.generate(_request(small_image)))
    engine.generate(_request(small_image, cache=spec))
    stopped = engine.generate(
        _request(small_image, cache=spec, seed=99), should_stop=_stop_after(5)
    )
    assert isinstance(stopped, Stopped)
    np.testing.assert_array_equal(_frames(engine.generate(_request(small_image))), baseline)
    assert engine.c.transformer._cache_config is None


def test_first_block_cache_runs_through_diffusers_hooks(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """The first-block cache kind generates a full video with diffusers' own hook."""
    frames = _frames(engine.generate(_request(small_image, cache=FirstBlockCacheSpec(0.5))))
    assert frames.shape == (5, 64, 96, 3)


def _stop_after(n: int) -> object:
    count = {"n": 0}

    def stop() -> bool:
        count["n"] += 1
        return count["n"] > n

    return stop
