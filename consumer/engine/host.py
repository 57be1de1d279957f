"""The engine host: starts the rank processes, runs one job at a time on them, restarts them.

Owns the rank processes, their pipes' reader threads, and when the engine moves through
EngineState. Must never block the event loop: pipes are read in threads, and every send
and join goes through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing as mp
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

import structlog

from i2v_fleet.connection import free_port
from i2v_fleet.consumer.errors import InternalError

from .child import engine_main
from .failures import EngineDied, EngineMisconfigured, job_error
from .state import EngineState
from .wire import (
    EngineConfig,
    EngineFailed,
    EngineReady,
    JobDone,
    JobFailed,
    JobProgress,
    JobStopped,
    RankExited,
    RankInfo,
    RunJob,
    Shutdown,
    StopJob,
    StopWhy,
)

log = structlog.get_logger(__name__)

ProgressCallback = Callable[[JobProgress], Awaitable[None]]


class EngineHost:
    """Starts the engine's rank processes, runs one job at a time on them, and restarts
    them all when any of them dies or the ranks fall out of step."""

    def __init__(
        self, config: EngineConfig, *, start_timeout_s: float, stall_timeout_s: float
    ) -> None:
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.restarts = 0
        self.device = ""
        self.ranks: tuple[RankInfo, ...] = ()
        self.ready: EngineReady | None = None
        """What the running engine reported when it was ready (backend, compile time)."""
        self._state = EngineState.NEW
        self._processes: list[SpawnProcess] = []
        self._conns: list[Connection] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sending = asyncio.Lock()  # a StopJob must never overtake its RunJob
        self._job: str | None = None
        """The job BUSY runs."""
        self._stop: StopJob | None = None
        """The stop sent for that job: the first one asked wins, later ones are dropped."""

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def alive(self) -> bool:
        return self._state.serving

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    async def start(self) -> None:
        """Spawn the ranks and wait until the model is loaded (or its load failed)."""
        self._become(EngineState.STARTING)
        try:
            message = await self._spawn_and_wait()
        except BaseException:
            await self.kill()
            raise
        if self._state is not EngineState.STARTING:  # closed or killed while it loaded
            raise EngineDied("the engine was stopped while it loaded the model")
        if isinstance(message, EngineFailed):
            await self.kill()
            if message.configuration:
                raise EngineMisconfigured(message.message)
            raise InternalError(f"the engine could not load the model: {message.message}")
        if not isinstance(message, EngineReady):
            await self.kill()
            raise EngineDied("an engine rank exited while loading the model")
        self.device, self.ranks, self.ready = message.device, message.ranks, message
        self._become(EngineState.READY)
        log.info(
            "engine ready",
            device=message.device,
            load_s=round(message.load_s, 1),
            ranks=self.config.nproc,
            attention=message.attention_backend,
            attention_ms=dict(sorted(message.attention_timings_ms.items())),
            compile_s=message.compile_s,
        )

    async def restart(self) -> None:
        await self.kill()
        self.restarts += 1
        await self.start()

    async def run(self, job: RunJob, on_progress: ProgressCallback) -> JobDone | JobStopped:
        """Run one job; `on_progress(JobProgress)` is awaited for each step. Raises JobError;
        EngineDied when the engine was lost under the job (it is then DEFUNCT)."""
        if not self.alive:
            raise EngineDied("the engine is not running")
        self._become(EngineState.BUSY)  # a second job at once is a bug: InternalError
        self._job, self._stop = job.job_id, None
        try:
            await self._send(job)
            message = await self._follow(job, on_progress)
        except BaseException:
            # EngineDied, or abandoned mid-job (cancelled, on_progress raised): the ranks
            # may still run a job nobody follows, so this engine cannot take the next one.
            self._leave_busy(EngineState.DEFUNCT)
            raise
        finally:
            self._job = self._stop = None
        if not isinstance(message, JobFailed):
            self._leave_busy(EngineState.READY)
            return message
        if not message.fatal:
            self._leave_busy(EngineState.READY)
            raise job_error(message)
        self._leave_busy(EngineState.DEFUNCT)  # the ranks fell out of step; they are exiting
        log.error("engine ranks out of step", code=message.code, error=message.message)
        if message.code == "internal":  # a broken collective, not the job
            raise EngineDied(message.message)
        raise job_error(message)

    async def stop_job(self, job_id: str, why: StopWhy, reason: str = "") -> None:
        """Ask the engine to stop `job_id` at its next step; run() then returns a JobStopped
        carrying `why` and `reason`. No-op when the job is not running or already stopping."""
        if self._state is not EngineState.BUSY or self._job != job_id or self._stop is not None:
            return
        self._stop = StopJob(job_id, why, reason)
        with contextlib.suppress(EngineDied):  # the job is ending anyway: run() says how
            await self._send(self._stop)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ask the engine to exit after its current step, then make sure it did."""
        if self._state is EngineState.CLOSED:
            return
        serving = self.alive
        self._become(EngineState.CLOSED)  # first: the ranks' exits are expected from now on
        if serving:
            with contextlib.suppress(EngineDied):  # already gone: the kill below tidies up
                await self._send(Shutdown())
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
        await self.kill()

    async def kill(self) -> None:
        """End the ranks now (SIGKILL); the engine is DEFUNCT until it is started again."""
        if self._state is EngineState.STARTING or self._state.serving:
            self._become(EngineState.DEFUNCT)
        processes, self._processes = self._processes, []
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            await asyncio.to_thread(process.join, 10)
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- inside ------------------------------------------------------------------------

    def _become(self, state: EngineState) -> None:
        was, self._state = self._state, self._state.to(state)
        log.debug("engine state", was=was.value, now=state.value)

    def _leave_busy(self, state: EngineState) -> None:
        """End BUSY, unless close() or kill() already moved the engine on meanwhile."""
        if self._state is EngineState.BUSY:
            self._become(state)

    async def _spawn_and_wait(self) -> Any:
        """Start every rank with a reader thread on its pipe; the first message (ready,
        failed, or a rank gone) or EngineDied when none came within the start timeout."""
        loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{free_port()}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue
        deliver = functools.partial(self._deliver, queue)
        for rank in range(self.config.nproc):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=engine_main,
                args=(child, self.config, rank, init),
                name=f"i2v-engine-{rank}",
                daemon=True,
            )
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
            threading.Thread(
                target=_read_pipe,
                args=(parent, rank, loop, deliver),
                name=f"i2v-engine-reader-{rank}",
                daemon=True,
            ).start()
        try:
            return await asyncio.wait_for(queue.get(), self.start_timeout_s)
        except TimeoutError:
            raise EngineDied(
                f"the engine did not load within {self.start_timeout_s:.0f} s"
            ) from None

    async def _follow(
        self, job: RunJob, on_progress: ProgressCallback
    ) -> JobDone | JobStopped | JobFailed:
        """The job's terminal message (JobDone, JobStopped or JobFailed), passing progress
        on; EngineDied when a rank exits or nothing arrives within the stall timeout."""
        while True:
            try:
                message = await asyncio.wait_for(self._queue.get(), self.stall_timeout_s)
            except TimeoutError:
                raise EngineDied(
                    f"the engine made no progress for {self.stall_timeout_s:.0f} s"
                ) from None
            if isinstance(message, RankExited):
                raise EngineDied(f"engine rank {message.rank} exited during the job")
            if getattr(message, "job_id", job.job_id) != job.job_id:
                continue  # a late message of an earlier job
            if isinstance(message, JobProgress):
                await on_progress(message)
            elif isinstance(message, (JobDone, JobStopped, JobFailed)):
                return message

    def _deliver(self, queue: asyncio.Queue[Any], message: Any) -> None:
        """On the loop: queue a rank's message; a rank gone while idle makes it DEFUNCT at
        once, so `alive` tells the truth before the next job is sent to a broken engine."""
        queue.put_nowait(message)
        idle = queue is self._queue and self._state is EngineState.READY
        if idle and isinstance(message, RankExited):
            log.warning("engine rank exited while idle", rank=message.rank)
            self._become(EngineState.DEFUNCT)

    async def _send(self, message: Any) -> None:
        if not self._conns:
            raise EngineDied("the engine is not running")
        async with self._sending:
            try:
                await asyncio.to_thread(self._conns[0].send, message)
            except OSError as exc:  # rank 0's pipe is gone: so is the engine
                raise EngineDied(f"the engine's pipe is closed: {exc}") from None


def _read_pipe(
    conn: Connection, rank: int, loop: asyncio.AbstractEventLoop, deliver: Callable[[Any], None]
) -> None:
    """Forward every message from one rank to the loop; RankExited when it is gone."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = RankExited(rank)
        try:
            loop.call_soon_threadsafe(deliver, message)
        except RuntimeError:  # the loop closed: nobody is listening any more
            return
        if isinstance(message, RankExited):
            return
