"""ATTENTION_BACKEND: every kernel this machine can run gives native's output, on one rank
and on the Ulysses path with padding; `auto` picks a timed exact kernel; a kernel the
node cannot run stops the engine with a message naming what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from i2v_fleet.pipeline import BackendUnavailable, WanI2V
from i2v_fleet.pipeline.attention import (
    AUTO_CANDIDATES,
    EXACT_BACKENDS,
    apply_backend,
    available_backends,
    choose_backend,
)
from i2v_fleet.pipeline.parallel import Ranks
from i2v_fleet.pipeline.tiny import TINY_HEAD_DIM, TINY_HEADS

from .ranks import run_ranks

CPU = torch.device("cpu")


def _transformer(model: Path) -> Any:
    from diffusers import WanTransformer3DModel

    t = WanTransformer3DModel.from_pretrained(model / "transformer", dtype=torch.float32)
    return t.eval().requires_grad_(False)


def _inputs(frames: int, height: int, width: int) -> dict[str, Any]:
    """Transformer inputs of frames x height/2 x width/2 tokens (patch 1x2x2)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 36, frames, height, width, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 32, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 17, 16, generator=gen),
        "return_dict": False,
    }


def _forward(transformer: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _native_afterwards() -> Any:
    """set_attention_backend is process-wide in diffusers: leave native for later tests."""
    yield
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_every_available_backend_gives_natives_frames(tiny_model_dir: Path) -> None:
    """On this machine's CPU each runnable exact kernel matches native (fp32, 1e-5)."""
    names = available_backends(CPU, torch.float32, TINY_HEAD_DIM)
    assert {"native", "_native_math"} <= set(names)
    transformer = _transformer(tiny_model_dir)
    inputs = _inputs(3, 6, 10)
    transformer.set_attention_backend("native")
    reference = _forward(transformer, inputs)
    for name in names:
        transformer.set_attention_backend(name)
        out = _forward(transformer, inputs)
        assert (out - reference).abs().max().item() <= 1e-5, name


def test_a_backend_set_while_the_attention_cache_is_installed_reaches_the_processors(
    tiny_model_dir: Path,
) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    from i2v_fleet.pipeline import AttentionCacheSpec
    from i2v_fleet.pipeline.caches import applied_cache

    transformer = _transformer(tiny_model_dir)
    with applied_cache(transformer, AttentionCacheSpec(0, 2, 1), 2):
        transformer.set_attention_backend("_native_math")
    for block in transformer.blocks:
        assert block.attn1.processor._attention_backend == AttentionBackendName._NATIVE_MATH


def _ulysses(rank: int, world: int, model: str) -> dict[str, Any]:
    """On each rank: every available backend over Ulysses (45 tokens: one of padding at 2
    ranks) against this rank's own single-process native forward, and how often each
    backend's kernel was called."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from i2v_fleet.pipeline.layout import ParallelLayout
    from i2v_fleet.pipeline.parallel import enable_ulysses

    transformer = _transformer(Path(model))
    inputs = _inputs(3, 6, 10)
    reference = _forward(transformer, inputs)
    ranks = Ranks.within(ParallelLayout(nproc=world, ulysses_size=world), CPU, timeout_s=60)
    enable_ulysses(transformer, ranks)
    diffs: dict[str, float] = {}
    calls: dict[str, int] = {}
    for name in available_backends(CPU, torch.float32, TINY_HEAD_DIM):
        transformer.set_attention_backend(name)
        backend = transformer.blocks[0].attn1.processor._attention_backend
        kernel = _AttentionBackendRegistry._backends[backend]
        calls[name] = 0

        def counted(*args: Any, _kernel: Any = kernel, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _kernel(*args, **kw)

        _AttentionBackendRegistry._backends[backend] = counted
        try:
            out = _forward(transformer, inputs)
        finally:
            _AttentionBackendRegistry._backends[backend] = kernel
        assert transformer._i2v_sequence.pad == 1
        diffs[name] = (out - reference).abs().max().item()
    return {"diffs": diffs, "calls": calls, "blocks": len(transformer.blocks)}


@pytest.mark.slow
@pytest.mark.distributed
def test_every_available_backend_is_exact_on_the_ulysses_path_with_padding(
    tiny_model_dir: Path,
) -> None:
    per_rank = run_ranks(_ulysses, 2, str(tiny_model_dir))
    names = available_backends(CPU, torch.float32, TINY_HEAD_DIM)
    for result in per_rank:
        assert sorted(result["diffs"]) == sorted(names)
        assert max(result["diffs"].values()) <= 1e-5, result["diffs"]
        # every block's self-attention (Ulysses) and cross-attention ran the chosen kernel
        assert min(result["calls"].values()) >= 2 * result["blocks"], result["calls"]


def test_auto_picks_the_fastest_available_exact_backend() -> None:
    choice = choose_backend("auto", CPU, torch.float32, TINY_HEADS, TINY_HEAD_DIM, 512)
    available = set(available_backends(CPU, torch.float32, TINY_HEAD_DIM))
    assert choice.requested == "auto"
    assert set(choice.timings_ms) == available & set(AUTO_CANDIDATES)
    assert choice.name in EXACT_BACKENDS
    assert choice.name == min(choice.timings_ms, key=choice.timings_ms.__getitem__)
    assert all(ms > 0 for ms in choice.timings_ms.values())


def test_auto_is_applied_and_reported_by_the_engine(tiny_model_dir: Path) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer = _transformer(tiny_model_dir)
    choice = apply_backend(transformer, "auto", Ranks(device=CPU), seq_len=256)
    assert choice.timings_ms
    assert choice.name in choice.timings_ms
    assert choice.name in choice.describe()
    assert "auto" in choice.describe()
    kinds = {b.attn1.processor._attention_backend for b in transformer.blocks}
    assert kinds == {AttentionBackendName(choice.name)}


def test_an_unavailable_backend_stops_the_engine_naming_what_is_missing(
    tiny_model_dir: Path,
) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        WanI2V.load(tiny_model_dir, device="cpu", attention_backend="_flash_3")
    message = str(caught.value)
    assert message.startswith("ATTENTION_BACKEND=_flash_3 needs the flash_attn_3 package")
    assert "CUDA device" in message
    assert "has: native, _native_math" in message


def test_sage_is_never_chosen_by_auto_and_unknown_names_are_refused() -> None:
    assert not any(name.startswith("sage") or "_sage" in name for name in AUTO_CANDIDATES)
    with pytest.raises(BackendUnavailable, match="not a backend this node knows"):
        choose_backend("flash9", CPU, torch.float32, TINY_HEADS, TINY_HEAD_DIM, 64)


def test_the_worker_refuses_an_unknown_backend_in_its_settings() -> None:
    from pydantic import ValidationError

    from i2v_fleet.consumer.settings import WorkerSettings

    assert WorkerSettings().attention_backend == "native"
    assert WorkerSettings(attention_backend="AUTO").attention_backend == "auto"
    with pytest.raises(ValidationError, match="ATTENTION_BACKEND must be one of"):
        WorkerSettings(attention_backend="flash9")
