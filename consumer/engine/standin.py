"""Stand-in engines for tests: the host's interface with a scripted behaviour and no model.

Owns the behaviours tests need from an engine, one per job in order (the last repeats), as
Cog's test predictors do: `sleep:S` (S seconds of steps, then a real MP4), `pace:S` (S
seconds for each of the job's `infer_steps`, as a model would take longer), `fail:CODE`
(the engine reports that error), `die` (the engine exits mid-job), `stall` (it stops
answering mid-job). Must never be selected on a production node: the worker's settings
refuse STANDIN_ENGINE unless I2V_TEST_TOOLS is set.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .failures import EngineDied, EngineMisconfigured, job_error
from .wire import (
    EngineReady,
    JobDone,
    JobFailed,
    JobProgress,
    JobStopped,
    RankInfo,
    RunJob,
    StopWhy,
)

KINDS = ("sleep", "pace", "fail", "die", "stall", "misconfigured")


@dataclass(frozen=True)
class Behaviour:
    kind: str
    seconds: float = 0.2
    code: str = "internal"
    retryable: bool = False


def parse(spec: str) -> list[Behaviour]:
    """`sleep:0.5,die,fail:out_of_memory` -> one behaviour per job, in order."""
    found = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, arg = part.partition(":")
        if kind not in KINDS:
            raise ValueError(
                f"unknown stand-in engine behaviour {kind!r} in {spec!r}; known: {', '.join(KINDS)}"
            )
        if kind == "sleep":
            found.append(Behaviour(kind, seconds=float(arg or 0.2)))
        elif kind == "pace":
            found.append(Behaviour(kind, seconds=float(arg or 0.1)))
        elif kind == "fail":
            code, _, retry = (arg or "internal").partition("/")
            found.append(Behaviour(kind, code=code, retryable=retry == "retryable"))
        elif kind == "stall":
            found.append(Behaviour(kind, seconds=float(arg or 1.0)))
        else:
            found.append(Behaviour(kind))
    if not found:
        raise ValueError("a stand-in engine needs at least one behaviour, e.g. sleep:0.2")
    return found


class StandInEngine:
    """The EngineHost interface over scripted behaviours; `steps` progress steps per job."""

    def __init__(self, spec: str, steps: int = 4, device: str = "cpu") -> None:
        self.script = parse(spec)
        self.steps = steps
        self.device = ""
        self._device = device
        self.ready: EngineReady | None = None
        self.ranks: tuple[RankInfo, ...] = ()
        self.restarts = 0
        self.jobs = 0
        """Jobs handed to the engine so far (the tests count re-runs with it)."""
        self._alive = False
        self._stops: dict[str, tuple[StopWhy, str]] = {}

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pids(self) -> list[int]:
        return []

    async def start(self) -> None:
        if self.script[0].kind == "misconfigured":
            raise EngineMisconfigured("the stand-in engine was told to refuse its settings")
        self._alive = True
        self.device = self._device
        self.ready = EngineReady(device=self.device, load_s=0.0, attention_backend="stand-in")
        self.ranks = (RankInfo(0, self.device, True, 0, 0, 0),)

    async def restart(self) -> None:
        await self.kill()
        await self.start()
        self.restarts += 1

    async def close(self, timeout_s: float = 10.0) -> None:
        self._alive = False

    async def kill(self) -> None:
        self._alive = False

    async def stop_job(self, job_id: str, why: StopWhy, reason: str = "") -> None:
        self._stops.setdefault(job_id, (why, reason))

    async def run(
        self, job: RunJob, on_progress: Callable[[JobProgress], Awaitable[None]]
    ) -> JobDone | JobStopped:
        behaviour = self.script[min(self.jobs, len(self.script) - 1)]
        self.jobs += 1
        started = time.perf_counter()
        if behaviour.kind == "fail":
            message = "the stand-in engine failed (as the test asked)"
            raise job_error(JobFailed(job.job_id, behaviour.code, message, behaviour.retryable))
        if behaviour.kind == "pace":  # the job's own steps, each taking the same time
            steps, step_s = max(1, job.request.infer_steps), behaviour.seconds
        else:  # steps of at most a quarter second, so progress shows soon in a long job
            steps = max(self.steps, math.ceil(behaviour.seconds / 0.25))
            step_s = behaviour.seconds / steps if behaviour.kind == "sleep" else 0.01
        # The engine's phases in its order: prompt, denoising steps, decoding.
        await on_progress(JobProgress(job.job_id, "encoding_prompt", 2, 2))
        for step in range(1, steps + 1):
            # A real engine looks for a stop between steps; a stand-in step is short slices.
            step_ends = time.monotonic() + step_s
            while True:
                stop = self._stops.pop(job.job_id, None)
                if stop is not None:
                    return JobStopped(job.job_id, step - 1, steps, stop[0], stop[1])
                if time.monotonic() >= step_ends:
                    break
                await asyncio.sleep(min(0.02, step_ends - time.monotonic()))
            await on_progress(JobProgress(job.job_id, "denoising", step, steps))
            if behaviour.kind == "die":
                self._alive = False
                raise EngineDied("the engine's rank 0 exited (the stand-in was told to die)")
            if behaviour.kind == "stall":
                await asyncio.sleep(behaviour.seconds)
                self._alive = False
                raise EngineDied(
                    f"the engine sent nothing for {behaviour.seconds:.1f} s "
                    "(ENGINE_STALL_TIMEOUT); it was stopped"
                )
        denoised = time.perf_counter()
        await on_progress(JobProgress(job.job_id, "decoding", 0, 1))
        done = await asyncio.to_thread(self._video, job)
        await on_progress(JobProgress(job.job_id, "decoding", 1, 1))
        timings = {"denoising": denoised - started, "decoding": time.perf_counter() - denoised}
        return replace(done, timings=timings)

    def _video(self, job: RunJob) -> JobDone:
        """A real, small MP4 and poster at the job's size (grey frames), as the engine's."""
        import numpy as np

        from i2v_fleet.pipeline.video import encode_mp4, write_poster

        request = job.request
        width, height, frames = request.width, request.height, request.num_frames
        video = np.full((frames, height, width, 3), 128, dtype=np.uint8)
        out = Path(job.out_dir)
        encode_mp4(video, out / "video.mp4", job.fps)
        write_poster(video[0], out / "poster.jpg")
        return JobDone(
            job.job_id,
            str(out / "video.mp4"),
            str(out / "poster.jpg"),
            width,
            height,
            frames,
            job.fps,
            request.seed if request.seed is not None else 0,
        )
