"""The persistent engine: a spawned process that loads the model once and runs jobs.

Owns the parent/child protocol (a handful of small dataclasses over a local pipe) and the
child's life: start, ready, run, stop, die, restart. The asyncio side never blocks: a
reader thread turns pipe messages into queue items. More ranks later speak through rank 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import InternalError, JobError, OutOfMemory

log = logging.getLogger(__name__)


# -- messages, parent -> child ---------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    job_id: str
    request: Any  # pipeline.GenerationRequest (a picklable dataclass with a PIL image)
    out_dir: str
    fps: int


@dataclass(frozen=True)
class StopJob:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# -- messages, child -> parent ---------------------------------------------------------


@dataclass(frozen=True)
class EngineReady:
    device: str
    load_s: float


@dataclass(frozen=True)
class EngineFailed:
    message: str


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    phase: str
    step: int
    total: int


@dataclass(frozen=True)
class JobDone:
    job_id: str
    video_path: str
    poster_path: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStopped:
    job_id: str
    step: int
    total_steps: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    code: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class EngineConfig:
    """What the child needs to load the model (plain values: it crosses a spawn)."""

    model_dir: str
    device: str | None = None
    t5_cpu: bool = False


class EngineDied(JobError):
    """The engine process exited or stopped answering; the job may run again elsewhere."""

    retryable = True


# -- the child ---------------------------------------------------------------------------


def engine_main(conn: Connection, config: EngineConfig) -> None:
    """Entry point of the engine process: load once, then serve jobs until Shutdown."""
    from pipeline import (
        Generated,
        PipelineError,
        WanI2V,
        encode_mp4,
        write_poster,
    )

    _die_with_parent()
    t0 = time.perf_counter()
    try:
        engine = WanI2V.load(config.model_dir, device=config.device, t5_cpu=config.t5_cpu)
    except Exception as exc:  # any load failure is reported, then the process exits
        conn.send(EngineFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(EngineReady(device=str(engine.c.device), load_s=time.perf_counter() - t0))

    pending: list[Any] = []
    while True:
        message = pending.pop(0) if pending else conn.recv()
        if isinstance(message, Shutdown):
            return
        if not isinstance(message, RunJob):
            continue  # a StopJob for a job that already ended
        job_id = message.job_id
        stop = {"flag": False}

        def should_stop(job_id: str = job_id, stop: dict[str, bool] = stop) -> bool:
            while conn.poll():
                incoming = conn.recv()
                if isinstance(incoming, StopJob) and incoming.job_id == job_id:
                    stop["flag"] = True
                elif isinstance(incoming, Shutdown):
                    stop["flag"] = True
                    pending.append(incoming)
            return stop["flag"]

        def on_progress(phase: str, step: int, total: int, job_id: str = job_id) -> None:
            conn.send(JobProgress(job_id, phase, step, total))

        try:
            outcome = engine.generate(message.request, on_progress, should_stop)
            if not isinstance(outcome, Generated):
                conn.send(JobStopped(job_id, outcome.step, outcome.total_steps, outcome.timings))
                continue
            on_progress("encoding_video", 0, 1)
            t_video = time.perf_counter()
            out = Path(message.out_dir)
            video, poster = out / "video.mp4", out / "poster.jpg"
            info = encode_mp4(outcome.frames, video, fps=message.fps)
            write_poster(outcome.frames[0], poster)
            timings = {**outcome.timings, "encoding_video": time.perf_counter() - t_video}
            on_progress("encoding_video", 1, 1)
            conn.send(
                JobDone(
                    job_id,
                    str(video),
                    str(poster),
                    info.width,
                    info.height,
                    info.num_frames,
                    message.fps,
                    outcome.seed,
                    timings,
                )
            )
        except PipelineError as exc:
            conn.send(JobFailed(job_id, exc.code, str(exc), exc.retryable))
        except Exception as exc:  # a bug or a library error: fail this job, keep serving
            log.exception("engine error in job %s", job_id)
            conn.send(JobFailed(job_id, "internal", f"engine error: {type(exc).__name__}", True))


def _die_with_parent() -> None:
    """Make the kernel kill this process when its supervisor dies, even by SIGKILL: an
    orphaned engine would hold the device's memory and the next engine could not load."""
    import ctypes
    import os
    import signal
    import sys

    parent = mp.parent_process()
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(1)


# -- the parent ------------------------------------------------------------------------


class EngineHost:
    """Starts the engine process, runs one job at a time on it, and restarts it when it dies."""

    def __init__(self, config: EngineConfig, *, start_timeout_s: float, stall_timeout_s: float):
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.restarts = 0
        self.device = ""
        self._process: Any = None
        self._conn: Connection | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def start(self) -> None:
        """Spawn the process and wait until the model is loaded (or its load failed)."""
        loop = asyncio.get_running_loop()
        parent, child = mp.get_context("spawn").Pipe()
        process = mp.get_context("spawn").Process(
            target=engine_main, args=(child, self.config), name="i2v-engine", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn, self._queue = process, parent, asyncio.Queue()
        queue = self._queue
        self._reader = threading.Thread(
            target=_read_pipe, args=(parent, loop, queue), name="i2v-engine-reader", daemon=True
        )
        self._reader.start()
        try:
            message = await asyncio.wait_for(queue.get(), self.start_timeout_s)
        except asyncio.TimeoutError:
            await self.kill()
            raise EngineDied(
                f"the engine did not load within {self.start_timeout_s:.0f} s"
            ) from None
        if isinstance(message, EngineFailed):
            await self.kill()
            raise InternalError(f"the engine could not load the model: {message.message}")
        if not isinstance(message, EngineReady):
            await self.kill()
            raise EngineDied("the engine exited while loading the model")
        self.device = message.device
        log.info("engine ready on %s in %.1f s", message.device, message.load_s)

    async def restart(self) -> None:
        await self.kill()
        self.restarts += 1
        await self.start()

    async def run(self, job: RunJob, on_progress: Any) -> JobDone | JobStopped:
        """Run one job; `on_progress(JobProgress)` is awaited for each step. Raises JobError."""
        await self._send(job)
        while True:
            try:
                message = await asyncio.wait_for(self._queue.get(), self.stall_timeout_s)
            except asyncio.TimeoutError:
                raise EngineDied(
                    f"the engine made no progress for {self.stall_timeout_s:.0f} s"
                ) from None
            if message is _EOF:
                raise EngineDied("the engine process exited during the job")
            if getattr(message, "job_id", job.job_id) != job.job_id:
                continue  # a late message of an earlier job
            if isinstance(message, JobProgress):
                await on_progress(message)
            elif isinstance(message, (JobDone, JobStopped)):
                return message
            elif isinstance(message, JobFailed):
                raise _job_error(message)

    async def stop_job(self, job_id: str) -> None:
        """Ask the engine to stop `job_id` at its next step (no-op if it already ended)."""
        with contextlib.suppress(OSError, EngineDied):
            await self._send(StopJob(job_id))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ask the engine to exit after its current step, then make sure it did."""
        with contextlib.suppress(OSError, EngineDied):
            await self._send(Shutdown())
        if self._process is not None:
            await asyncio.to_thread(self._process.join, timeout_s)
        await self.kill()

    async def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 10)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _send(self, message: Any) -> None:
        if self._conn is None or not self.alive:
            raise EngineDied("the engine process is not running")
        await asyncio.to_thread(self._conn.send, message)


_EOF = object()


def _read_pipe(
    conn: Connection, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]
) -> None:
    """Forward every message from the child to the loop's queue; `_EOF` when it is gone."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = _EOF
        try:
            loop.call_soon_threadsafe(queue.put_nowait, message)
        except RuntimeError:  # the loop closed: nobody is listening any more
            return
        if message is _EOF:
            return


def _job_error(failed: JobFailed) -> JobError:
    from .errors import ImageRejected, InvalidJob

    by_code: dict[str, type[JobError]] = {
        "invalid_request": InvalidJob,
        "image_invalid": ImageRejected,
        "out_of_memory": OutOfMemory,
    }
    error = by_code.get(failed.code, InternalError)(failed.message)
    return error
