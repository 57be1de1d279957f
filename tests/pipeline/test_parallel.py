"""Several ranks make the same video as one: Ulysses, CFG parallel, FSDP, T5 on rank 0,
VAE parallel, at world sizes 2 and 4 on CPU with gloo.

Tolerance: the frames (uint8) of every layout differ from world size 1's by at most one
level per pixel (the same arithmetic in a different order: sharded matmuls and padded
attention round differently in the last bits), and by much less on average.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from i2v_fleet.pipeline.layout import ParallelLayout

from .ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Sizes whose token count divides every degree, and one that needs padding at 4 ranks
# (80x48: 5x3 patches x 2 latent frames = 30 tokens).
SIZES = {"even": (64, 64), "padded": (80, 48)}


def _request(size: str, seed: int = 11) -> Any:
    from PIL import Image

    from i2v_fleet.pipeline import GenerationRequest

    width, height = SIZES[size]
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 3, y * 4, (x + y) % 256], axis=-1).astype(np.uint8)
    return GenerationRequest(
        image=Image.fromarray(pixels, "RGB"),
        prompt="a red fox runs through fresh snow",
        width=width,
        height=height,
        num_frames=5,
        infer_steps=3,
        guidance_scale=3.0,
        seed=seed,
    )


def _generate(rank: int, world: int, model: str, cases: list[tuple[ParallelLayout, str]]) -> Any:
    """On each rank: load the engine for every layout in turn and make one video each."""
    import torch

    from i2v_fleet.pipeline import WanI2V
    from i2v_fleet.pipeline.parallel import Ranks
    from i2v_fleet.pipeline.sharding import local_param_bytes

    results = []
    for layout, size in cases:
        ranks = Ranks.within(layout, torch.device("cpu"), timeout_s=60)
        engine = WanI2V.load(model, device="cpu", ranks=ranks, layout=layout)
        outcome = engine.generate(_request(size))
        results.append(
            {
                "frames": outcome.frames if rank == 0 else None,
                "text_encoder": engine.c.text_encoder is not None,
                "param_bytes": local_param_bytes(engine.c.transformer),
            }
        )
    return results


def _layouts(world: int) -> list[tuple[ParallelLayout, str]]:
    full = ParallelLayout(nproc=world, ulysses_size=world)
    half = ParallelLayout(nproc=world, ulysses_size=world // 2, cfg_size=2)
    return [
        (full, "even"),
        (replace(full, dit_fsdp=True, t5_fsdp=True, vae_parallel=True), "even"),
        (replace(half, t5_cpu=True), "even"),
        (replace(half, dit_fsdp=True, vae_parallel=True), "padded"),
        (replace(full, vae_parallel=True, t5_cpu=True), "padded"),
    ]


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 4 attention heads (of 8), so Ulysses 4 divides them."""
    from i2v_fleet.pipeline import write_tiny_model

    heads = {"num_attention_heads": 4, "attention_head_dim": 8, "added_kv_proj_dim": 32}
    return write_tiny_model(tmp_path_factory.mktemp("tiny4"), transformer=heads)


@pytest.fixture(scope="module")
def engine(four_heads: Path) -> Any:
    """World size 1: the engine every layout is compared with."""
    from i2v_fleet.pipeline import WanI2V

    return WanI2V.load(four_heads, device="cpu")


@pytest.fixture(scope="module")
def reference(engine: Any) -> dict[str, np.ndarray]:
    """World size 1's frames for each size."""
    return {size: engine.generate(_request(size)).frames for size in SIZES}


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_makes_the_frames_of_one_rank(
    world: int, four_heads: Path, engine: Any, reference: dict[str, np.ndarray]
) -> None:
    cases = _layouts(world)
    per_rank = run_ranks(_generate, world, str(four_heads), cases, timeout_s=600)
    from i2v_fleet.pipeline.sharding import local_param_bytes

    full_bytes = local_param_bytes(engine.c.transformer)
    for i, (layout, size) in enumerate(cases):
        frames = per_rank[0][i]["frames"]
        expected = reference[size]
        assert frames.shape == expected.shape, layout
        diff = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
        print(f"{layout}: max |diff| {diff.max()}, mean {diff.mean():.2e}")
        assert diff.max() <= 1, (layout, diff.max())
        assert diff.mean() < 0.01, (layout, diff.mean())
        loaded = [r[i]["text_encoder"] for r in per_rank]
        assert loaded == ([True] + [False] * (world - 1) if layout.t5_cpu else [True] * world)
        largest = max(r[i]["param_bytes"] for r in per_rank)
        if layout.dit_fsdp:
            assert largest <= full_bytes / 3 if world == 4 else largest < full_bytes * 0.6
        else:
            assert largest == full_bytes


def _generate_cached(rank: int, world: int, model: str, threshold: float) -> Any:
    """On each rank: the sharded engine (DIT_FSDP) with the first-block cache."""
    import torch

    from i2v_fleet.pipeline import WanI2V
    from i2v_fleet.pipeline.parallel import Ranks
    from i2v_fleet.pipeline.request import FirstBlockCacheSpec

    layout = ParallelLayout(nproc=world, ulysses_size=world, dit_fsdp=True)
    ranks = Ranks.within(layout, torch.device("cpu"), timeout_s=60)
    engine = WanI2V.load(model, device="cpu", ranks=ranks, layout=layout)
    encodes = []
    encode = engine.c.vae.encode
    engine.c.vae.encode = lambda *a, **k: encodes.append(1) or encode(*a, **k)
    outcome = engine.generate(replace(_request("even"), cache=FirstBlockCacheSpec(threshold)))
    return {"frames": outcome.frames if rank == 0 else None, "vae_encodes": len(encodes)}


def test_the_first_block_cache_runs_on_sharded_blocks(four_heads: Path, engine: Any) -> None:
    """FSDP2 renames the block class, which diffusers' cache hooks did not know: the
    first-block cache on DIT_FSDP ranks skips the same steps as one rank, same frames.
    (Also: only rank 0 runs the VAE encode of the condition frames.)"""
    from i2v_fleet.pipeline.request import FirstBlockCacheSpec

    threshold = 1.0  # the loosest: most steps reuse the cached residual
    single = engine.generate(replace(_request("even"), cache=FirstBlockCacheSpec(threshold)))
    plain = engine.generate(_request("even"))
    per_rank = run_ranks(_generate_cached, 2, str(four_heads), threshold, timeout_s=300)
    assert not np.array_equal(single.frames, plain.frames)  # the cache did skip work
    # The condition frames go through the VAE on rank 0 alone; the others receive them.
    assert [r["vae_encodes"] for r in per_rank] == [1, 0]
    diff = np.abs(per_rank[0]["frames"].astype(np.int16) - single.frames.astype(np.int16))
    assert diff.max() <= 1, diff.max()
