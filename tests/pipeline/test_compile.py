"""TORCH_COMPILE: compiled blocks make the eager engine's frames, with and without each
cache, and a warmed engine compiles nothing more while it serves.

One compiled engine for the module (compiling on the CPU takes seconds). Tolerance: one
uint8 level per pixel (inductor fuses and reorders fp32 arithmetic; measured differences
before rounding are below 1e-6).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from i2v_fleet.pipeline import (
    AttentionCacheSpec,
    FirstBlockCacheSpec,
    Generated,
    GenerationRequest,
    WanI2V,
)
from i2v_fleet.pipeline.compile import graph_count, parse_sizes

WARMED = (96, 64, 5)


def _request(image: Image.Image, **overrides: Any) -> GenerationRequest:
    base = GenerationRequest(
        image=image,
        prompt="a cat walks along a sunlit windowsill",
        width=96,
        height=64,
        num_frames=5,
        infer_steps=4,
        guidance_scale=3.0,
        seed=5,
    )
    return replace(base, **overrides)


def _frames(outcome: object) -> np.ndarray:
    assert isinstance(outcome, Generated)
    return outcome.frames


def _close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < 0.01, diff.mean()


@pytest.fixture(scope="module")
def compiled(tiny_model_dir: Path) -> WanI2V:
    return WanI2V.load(tiny_model_dir, device="cpu", torch_compile=True, warmup_sizes=(WARMED,))


def test_sizes_parse_with_and_without_frames() -> None:
    assert parse_sizes("1280*720, 720*1280*33") == ((1280, 720, 81), (720, 1280, 33))
    assert parse_sizes("") == ()
    with pytest.raises(ValueError, match="WIDTH\\*HEIGHT"):
        parse_sizes("1280")


@pytest.mark.slow
def test_warm_up_compiles_the_blocks_at_start(compiled: WanI2V) -> None:
    assert compiled.compiled is not None
    assert compiled.compiled.sizes == (WARMED,)
    assert compiled.compiled.graphs >= 1
    assert compiled.attention is not None
    assert compiled.attention.name == "native"


@pytest.mark.slow
@pytest.mark.parametrize(
    "cache",
    [None, AttentionCacheSpec(1, 2, 3), FirstBlockCacheSpec(0.05)],
    ids=["no-cache", "attention-cache", "first-block-cache"],
)
def test_compiled_frames_equal_eager_frames_without_compiling_again(
    compiled: WanI2V, engine: WanI2V, small_image: Image.Image, cache: Any
) -> None:
    """The warm-up compiled every graph a job at a warmed size needs, whatever its cache:
    the first job and the next one compile nothing (no recompile per block or per job)."""
    request = _request(small_image, cache=cache)
    expected = _frames(engine.generate(request))
    before = graph_count()
    first = _frames(compiled.generate(request))
    second = _frames(compiled.generate(replace(request, seed=6)))
    assert graph_count() == before
    _close(first, expected)
    assert not np.array_equal(first, second)  # the second job really ran


@pytest.mark.slow
def test_a_new_size_does_not_recompile(compiled: WanI2V, small_image: Image.Image) -> None:
    """Dynamic shapes: a size the warm-up never saw runs on the same graphs."""
    image = small_image.resize((64, 96))
    before = graph_count()
    _frames(compiled.generate(_request(image, width=64, height=96, infer_steps=2)))
    assert graph_count() == before
