"""A multi-rank engine as the supervisor drives it: lockstep stop, errors on one rank,
a rank killed or frozen, and the engine serving on (or restarted) afterwards.

Each test starts real rank processes (gloo on CPU) with the tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from i2v_fleet.consumer.engine import (
    EngineConfig,
    EngineDied,
    EngineHost,
    EngineState,
    JobDone,
    JobStopped,
    RunJob,
    StopWhy,
)
from i2v_fleet.consumer.errors import JobError
from i2v_fleet.pipeline.layout import ParallelLayout

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COLLECTIVE_TIMEOUT_S = 8.0


def _job(out: Path, steps: int = 4, seed: int = 3) -> RunJob:
    from i2v_fleet.pipeline import GenerationRequest

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 3, y * 4, (x + y) % 256], axis=-1).astype(np.uint8)
    request = GenerationRequest(
        image=Image.fromarray(pixels, "RGB"),
        prompt="a paper boat drifts down a street",
        width=64,
        height=64,
        num_frames=5,
        infer_steps=steps,
        guidance_scale=3.0,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    return RunJob(job_id=f"job-{random.randrange(10**9)}", request=request, out_dir=str(out), fps=8)


def _config(model: Path, **fields: Any) -> EngineConfig:
    """Two Ulysses ranks on the CPU; layout fields (nproc=...) and others (fault=...) apply."""
    base = EngineConfig(
        model_dir=str(model),
        device="cpu",
        layout=ParallelLayout(nproc=2, ulysses_size=2),
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
    )
    shape = {k: fields.pop(k) for k in list(fields) if k in ParallelLayout.__dataclass_fields__}
    return replace(base, layout=replace(base.layout, **shape), **fields)


async def _started(config: EngineConfig) -> EngineHost:
    host = EngineHost(config, start_timeout_s=180, stall_timeout_s=120)
    await host.start()
    return host


async def _no_progress(_: Any) -> None:
    return None


async def test_a_cancel_stops_every_rank_on_the_same_step_and_the_engine_serves_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    host = await _started(_config(tiny_model_dir, nproc=4, ulysses_size=2, cfg_size=2))
    try:
        pids = host.pids
        stop_after = random.randint(1, 4)
        job = _job(tmp_path / "a", steps=6)

        async def on_progress(p: Any) -> None:
            if p.phase == "denoising" and p.step == stop_after:
                await host.stop_job(job.job_id, StopWhy.CANCEL, "changed my mind")
                await host.stop_job(job.job_id, StopWhy.TIMEOUT)  # the first stop wins

        outcome = await host.run(job, on_progress)
        assert isinstance(outcome, JobStopped)
        assert (outcome.why, outcome.reason) == (StopWhy.CANCEL, "changed my mind")
        # The stop arrives while step stop_after+1 may already run: it ends there at most.
        assert stop_after <= outcome.step <= stop_after + 1
        assert host.state is EngineState.READY
        assert host.pids == pids
        done = await host.run(_job(tmp_path / "b", steps=2), _no_progress)
        assert isinstance(done, JobDone)
        assert host.pids == pids
    finally:
        await host.close()


async def test_an_error_on_rank_1_outside_collectives_fails_the_job_everywhere(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Pass 3 is step 1's unconditional pass: after it the step has no collective left.
    host = await _started(_config(tiny_model_dir, fault="raise_after:1:3"))
    try:
        pids = host.pids
        with pytest.raises(JobError, match="rank 1: engine error: RuntimeError: injected fault"):
            await host.run(_job(tmp_path / "a"), _no_progress)
        # Every rank left the job at that step and the group is still usable.
        assert host.alive
        assert host.pids == pids
        done = await host.run(_job(tmp_path / "b", steps=2), _no_progress)
        assert isinstance(done, JobDone)
    finally:
        await host.close()


async def test_an_error_on_rank_1_inside_a_collective_restarts_the_engine(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    host = await _started(_config(tiny_model_dir, fault="raise:1:2"))
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineDied, match="injected fault on rank 1"):
            await host.run(_job(tmp_path / "a"), _no_progress)
        # Rank 1 waits a bounded time for the others (5 s + two steps), then exits.
        print(f"error inside a collective: attempt ended after {time.monotonic() - t0:.1f} s")
        assert time.monotonic() - t0 < 30
        assert host.state is EngineState.DEFUNCT
        assert not host.alive
        host.config = replace(host.config, fault="")  # the restarted engine is healthy
        await host.restart()
        done = await host.run(_job(tmp_path / "b", steps=2), _no_progress)
        assert isinstance(done, JobDone)
    finally:
        await host.close()


async def test_a_rank_logs_its_error_as_one_line_with_node_rank_and_job(
    tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1's error reaches stderr as a structured line naming node, rank and job."""
    config = _config(tiny_model_dir, fault="raise_after:1:3", node_id="gpu-9-lane1")
    host = await _started(config)
    job = _job(tmp_path / "a")
    try:
        with pytest.raises(JobError, match="injected fault"):
            await host.run(job, _no_progress)
    finally:
        await host.close()  # every rank has exited: all it wrote is in the capture
    err = capfd.readouterr().err
    lines = []
    for line in err.splitlines():
        with contextlib.suppress(ValueError):  # torch's own C++ warnings are not ours
            lines.append(json.loads(line))
    errors = [line for line in lines if line.get("level") == "error"]
    assert errors, err
    assert {(e["node_id"], e["rank"], e["job_id"]) for e in errors} == {
        ("gpu-9-lane1", 1, job.job_id)
    }
    assert "RuntimeError: injected fault on rank 1" in errors[0]["exception"]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_a_dead_or_frozen_rank_is_detected_and_the_engine_restarted(
    tiny_model_dir: Path, tmp_path: Path, how: str
) -> None:
    host = await _started(_config(tiny_model_dir))
    try:
        victim = host.pids[1]
        job = _job(tmp_path / "a", steps=8)
        hit = asyncio.Event()

        async def on_progress(p: Any) -> None:
            if p.phase == "denoising" and p.step == 2 and not hit.is_set():
                hit.set()
                os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)

        t0 = time.monotonic()
        with pytest.raises(EngineDied):
            await host.run(job, on_progress)
        detected = time.monotonic() - t0
        print(f"rank 1 {how}: the job ended {detected:.1f} s after the job started")
        # A dead rank closes its pipe at once; a frozen one trips the collective timeout.
        assert detected < (10 if how == "killed" else 2 * COLLECTIVE_TIMEOUT_S + 15)
        await host.restart()
        assert victim not in host.pids
        done = await host.run(_job(tmp_path / "b", steps=2), _no_progress)
        assert isinstance(done, JobDone)
    finally:
        await host.close()
