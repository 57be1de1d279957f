"""The persistent engine: a spawned process that loads the model once and runs jobs.

Owns the parent/child protocol (a handful of small dataclasses over local pipes) and the
engine's life: start, ready, run, stop, die, restart. An engine is NPROC rank processes
(pipeline.parallel): rank 0 takes commands and reports; every rank can report its own
fatal error, and any rank exiting is noticed at once (its pipe closes). Between jobs
rank 0 sends the others a keep-alive so an idle engine never trips the collective
timeout. The asyncio side never blocks: reader threads turn pipe messages into queue items.

Over 400 lines, knowingly: the wire messages, the rank processes' loops and the host are
to become three modules (protocol, child, host); they share the message types today.
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


@dataclass(frozen=True)
class KeepAlive:
    """Rank 0 to the other ranks while idle: nothing to do, the group is alive."""


# -- messages, child -> parent ---------------------------------------------------------


@dataclass(frozen=True)
class RankInfo:
    """What one rank holds once loaded (shown on /info, checked by the tests)."""

    rank: int
    device: str
    text_encoder: bool
    transformer_param_bytes: int
    peak_rss_bytes: int
    pid: int


@dataclass(frozen=True)
class EngineReady:
    device: str
    load_s: float
    ranks: tuple[RankInfo, ...] = ()
    attention_backend: str = ""
    """The attention kernel every rank runs (ATTENTION_BACKEND, resolved)."""
    attention_timings_ms: dict[str, float] = field(default_factory=dict)
    """With ATTENTION_BACKEND=auto: ms per attention call of each kernel timed."""
    compile_s: float | None = None
    """With TORCH_COMPILE: seconds the warm-up (compiling) took; None when not compiled."""


@dataclass(frozen=True)
class EngineFailed:
    message: str
    configuration: bool = False
    """The node's own settings are at fault (a backend it cannot run, a checkpoint it
    refuses, blocks that do not compile): starting again cannot help."""


class EngineMisconfigured(Exception):
    """The engine cannot start with this node's settings; the message says what to change.
    The worker stops (exit 2) instead of restarting the engine forever."""


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
    fatal: bool = False
    """The ranks fell out of step: the engine exits and must be restarted."""


@dataclass(frozen=True)
class RankExited:
    """A rank's pipe closed: the process is gone (the host's own marker, never sent)."""

    rank: int


@dataclass(frozen=True)
class EngineConfig:
    """What the ranks need to load the model (plain values: it crosses a spawn)."""

    model_dir: str
    device: str | None = None
    t5_cpu: bool = False
    nproc: int = 1
    ulysses_size: int = 1
    cfg_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    vae_parallel: bool = False
    cards: tuple[int, ...] = ()
    """The device indices of this engine's ranks (a lane's cards); () = 0..nproc-1."""
    collective_timeout_s: float = 600.0
    """How long a rank waits in a collective before the engine counts as broken."""
    attention_backend: str = "native"
    """ATTENTION_BACKEND: a diffusers backend name, or auto."""
    torch_compile: bool = False
    warmup_sizes: tuple[tuple[int, int, int], ...] = ((1280, 720, 81), (720, 1280, 81))
    """(width, height, frames) the compiled engine warms at; auto times the largest."""
    loras: str = ""
    """MODEL_LORAS: `path[:scale],...` adapters fused into the transformer at load."""
    fault: str = ""
    """Testing only: `kind:rank:step` makes a rank fail (see `_install_fault`)."""

    @property
    def layout(self) -> Any:
        from i2v_fleet.pipeline.layout import ParallelLayout

        return ParallelLayout(
            nproc=self.nproc,
            ulysses_size=self.ulysses_size,
            cfg_size=self.cfg_size,
            dit_fsdp=self.dit_fsdp,
            t5_fsdp=self.t5_fsdp,
            t5_cpu=self.t5_cpu,
            vae_parallel=self.vae_parallel,
        )

    def rank_device(self, rank: int) -> str:
        """This rank's device: its card of the lane on cuda/npu, the CPU otherwise."""
        if self.device == "cpu":
            return "cpu"
        from i2v_fleet.pipeline.devices import detect_kind

        kind = detect_kind(self.device)
        if kind == "cpu":
            return "cpu"
        cards = self.cards or tuple(range(self.nproc))
        return f"{kind}:{cards[rank]}"


class EngineDied(JobError):
    """The engine process exited or stopped answering; the job may run again elsewhere."""

    retryable = True


# -- the child ---------------------------------------------------------------------------


def engine_main(conn: Connection, config: EngineConfig, rank: int = 0, init: str = "") -> None:
    """Entry point of one rank: load once, then serve jobs until Shutdown."""
    import os

    from i2v_fleet.pipeline import WanI2V
    from i2v_fleet.pipeline.lora import parse_loras
    from i2v_fleet.pipeline.parallel import Ranks, RanksOutOfStep

    _die_with_parent()
    t0 = time.perf_counter()
    device = config.rank_device(rank)
    try:
        if config.nproc > 1:
            import torch

            if device in (None, "cpu"):  # share the cores instead of oversubscribing them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.nproc))
            dev = torch.device(device or "cpu")
            if dev.type != "cpu":
                getattr(torch, dev.type).set_device(dev)
            ranks = Ranks.start(config.layout, rank, dev, init, config.collective_timeout_s)
        else:
            ranks = None
        engine = WanI2V.load(
            config.model_dir,
            device=device,
            ranks=ranks,
            layout=config.layout,
            attention_backend=config.attention_backend,
            torch_compile=config.torch_compile,
            warmup_sizes=config.warmup_sizes,
            loras=parse_loras(config.loras),
        )
        _install_fault(engine, config.fault, rank)
    except Exception as exc:  # any load failure is reported, then the process exits
        from i2v_fleet.pipeline import BackendUnavailable, CompileFailed, ModelLoadError

        settings = isinstance(exc, (BackendUnavailable, CompileFailed, ModelLoadError))
        if settings:  # what to change is in the message; a traceback would only bury it
            log.error("rank %d cannot start with these settings: %s", rank, exc)
        else:
            log.exception("rank %d could not load the model", rank)
        conn.send(EngineFailed(f"rank {rank}: {type(exc).__name__}: {exc}", settings))
        return
    infos = engine.ranks.gather_objects(_rank_info(engine, rank))
    if rank == 0:
        attention, compiled = engine.attention, engine.compiled
        conn.send(
            EngineReady(
                str(engine.c.device),
                time.perf_counter() - t0,
                tuple(infos),
                attention_backend=attention.name if attention else "",
                attention_timings_ms=dict(attention.timings_ms) if attention else {},
                compile_s=compiled.warmup_s if compiled else None,
            )
        )
    keepalive_s = config.collective_timeout_s / 3

    commands: list[Any] = []
    while True:
        if rank == 0:
            if commands:
                message = commands.pop(0)
            else:
                message = conn.recv() if conn.poll(keepalive_s) else KeepAlive()
            if isinstance(message, StopJob):
                continue  # for a job that already ended
            engine.ranks.broadcast_object(message)
        else:
            message = engine.ranks.broadcast_object()
        if isinstance(message, Shutdown):
            engine.ranks.close()
            return
        if not isinstance(message, RunJob):
            continue
        try:
            _run_job(engine, conn if rank == 0 else None, message, commands)
        except RanksOutOfStep as exc:
            code, text, retryable = exc.failure or ("internal", str(exc), True)
            conn.send(JobFailed(message.job_id, code, text, retryable, fatal=True))
            os._exit(1)


def _run_job(engine: Any, conn: Connection | None, message: RunJob, commands: list[Any]) -> None:
    """One job on this rank; only rank 0 (with `conn`) reports and writes the video."""
    from i2v_fleet.pipeline import Generated, PipelineError, write_poster
    from i2v_fleet.pipeline.video import BackgroundMp4

    job_id = message.job_id
    stop = {"flag": False}

    def should_stop() -> bool:
        assert conn is not None
        while conn.poll():
            incoming = conn.recv()
            if isinstance(incoming, StopJob) and incoming.job_id == job_id:
                stop["flag"] = True
            elif isinstance(incoming, Shutdown):
                stop["flag"] = True
                commands.append(incoming)
        return stop["flag"]

    def on_progress(phase: str, step: int, total: int) -> None:
        assert conn is not None
        conn.send(JobProgress(job_id, phase, step, total))

    out = Path(message.out_dir)
    video, poster = out / "video.mp4", out / "poster.jpg"
    mp4: Any = None
    try:
        # Rank 0 encodes the MP4 in a thread while the decoder makes the next frames.
        mp4 = BackgroundMp4(video, message.fps) if conn is not None else None
        outcome = engine.generate(
            message.request,
            on_progress if conn else None,
            should_stop if conn else None,
            mp4.submit if mp4 is not None else None,
        )
    except PipelineError as exc:  # every rank agreed on it: the engine stays usable
        _abort(mp4)
        if conn is not None:
            conn.send(JobFailed(job_id, exc.code, str(exc), exc.retryable))
        return
    except Exception as exc:
        _abort(mp4)
        if engine.ranks.distributed:  # a collective broke: the group is unusable
            raise _out_of_step(exc) from exc
        log.exception("engine error in job %s", job_id)
        assert conn is not None
        conn.send(JobFailed(job_id, "internal", f"engine error: {type(exc).__name__}", True))
        return
    if conn is None:
        return
    if not isinstance(outcome, Generated):
        _abort(mp4)
        conn.send(JobStopped(job_id, outcome.step, outcome.total_steps, outcome.timings))
        return
    try:
        on_progress("encoding_video", 0, 1)
        t_video = time.perf_counter()
        info = mp4.finish()  # what is left to encode after the last frame was decoded
        write_poster(outcome.frames[0], poster)
        timings = {**outcome.timings, "encoding_video": time.perf_counter() - t_video}
        on_progress("encoding_video", 1, 1)
    except PipelineError as exc:
        conn.send(JobFailed(job_id, exc.code, str(exc), exc.retryable))
        return
    except Exception as exc:  # rank 0 alone, after the ranks finished: keep serving
        log.exception("could not write the video of job %s", job_id)
        conn.send(JobFailed(job_id, "internal", f"engine error: {type(exc).__name__}", True))
        return
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


def _abort(mp4: Any) -> None:
    """Drop a video that will not be finished (a stopped or failed job)."""
    if mp4 is not None:
        with contextlib.suppress(Exception):
            mp4.abort()


def _out_of_step(exc: BaseException) -> Exception:
    from i2v_fleet.pipeline.parallel import RanksOutOfStep

    if isinstance(exc, RanksOutOfStep):
        return exc
    failure = RanksOutOfStep(f"a collective failed: {type(exc).__name__}: {exc}")
    failure.failure = ("internal", f"engine error: {type(exc).__name__}: {exc}", True)
    return failure


def _rank_info(engine: Any, rank: int) -> RankInfo:
    import os

    from i2v_fleet.pipeline.sharding import local_param_bytes

    c = engine.c
    return RankInfo(
        rank=rank,
        device=str(c.device),
        text_encoder=c.text_encoder is not None,
        transformer_param_bytes=local_param_bytes(c.transformer),
        peak_rss_bytes=_peak_rss(),
        pid=os.getpid(),
    )


def _peak_rss() -> int:
    """This process's peak resident memory: VmHWM (ru_maxrss also counts exited threads'
    peaks for good, so it can only grow), or ru_maxrss where /proc is missing."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _install_fault(engine: Any, fault: str, rank: int) -> None:
    """Testing only. `kind:rank:n` makes `rank` fail in its n-th transformer pass (from 0;
    one pass per guidance branch and step). `raise`: an exception inside the last block,
    while the other ranks go on into collectives; `raise_after`: an exception after the
    transformer, outside any collective; `exit`: the process dies inside the forward."""
    if not fault:
        return
    import os

    kind, fault_rank, fault_pass = fault.split(":")
    if int(fault_rank) != rank:
        return
    passes = {"n": -1}
    transformer = engine.c.transformer

    def count(*_: Any) -> None:
        passes["n"] += 1

    def fire(*_: Any) -> None:
        if passes["n"] == int(fault_pass):
            if kind == "exit":
                os._exit(3)
            raise RuntimeError(f"injected fault on rank {rank}")

    transformer.rope.register_forward_pre_hook(count)
    if kind == "raise_after":
        transformer.proj_out.register_forward_hook(fire)
    else:
        transformer.blocks[-1].register_forward_pre_hook(fire)


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
    """Starts the engine's rank processes, runs one job at a time on them, and restarts
    them all when any of them dies or the ranks fall out of step."""

    def __init__(self, config: EngineConfig, *, start_timeout_s: float, stall_timeout_s: float):
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.restarts = 0
        self.device = ""
        self.ranks: tuple[RankInfo, ...] = ()
        self.ready: EngineReady | None = None
        """What the running engine reported when it was ready (backend, compile time)."""
        self._processes: list[Any] = []
        self._conns: list[Connection] = []
        self._broken = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def alive(self) -> bool:
        return (
            bool(self._processes)
            and not self._broken
            and all(p.is_alive() for p in self._processes)
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    async def start(self) -> None:
        """Spawn the ranks and wait until the model is loaded (or its load failed)."""
        loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{_free_port()}"
        self._queue, self._broken = asyncio.Queue(), False
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
                args=(parent, rank, loop, self._queue),
                name=f"i2v-engine-reader-{rank}",
                daemon=True,
            ).start()
        try:
            message = await asyncio.wait_for(self._queue.get(), self.start_timeout_s)
        except asyncio.TimeoutError:
            await self.kill()
            raise EngineDied(
                f"the engine did not load within {self.start_timeout_s:.0f} s"
            ) from None
        if isinstance(message, EngineFailed):
            await self.kill()
            if message.configuration:
                raise EngineMisconfigured(message.message)
            raise InternalError(f"the engine could not load the model: {message.message}")
        if not isinstance(message, EngineReady):
            await self.kill()
            raise EngineDied("an engine rank exited while loading the model")
        self.device, self.ranks, self.ready = message.device, message.ranks, message
        log.info(
            "engine ready on %s in %.1f s (%d rank%s), attention %s%s%s",
            message.device,
            message.load_s,
            self.config.nproc,
            "" if self.config.nproc == 1 else "s",
            message.attention_backend,
            "".join(f", {k} {v:.2f} ms" for k, v in sorted(message.attention_timings_ms.items())),
            "" if message.compile_s is None else f", compiled in {message.compile_s:.1f} s",
        )

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
                self._broken = True
                raise EngineDied(
                    f"the engine made no progress for {self.stall_timeout_s:.0f} s"
                ) from None
            if isinstance(message, RankExited):
                self._broken = True
                raise EngineDied(f"engine rank {message.rank} exited during the job")
            if getattr(message, "job_id", job.job_id) != job.job_id:
                continue  # a late message of an earlier job
            if isinstance(message, JobProgress):
                await on_progress(message)
            elif isinstance(message, (JobDone, JobStopped)):
                return message
            elif isinstance(message, JobFailed):
                if message.fatal:  # the ranks fell out of step; they are exiting
                    self._broken = True
                    log.error("engine ranks out of step in job %s: %s", job.job_id, message)
                    if message.code == "internal":  # a broken collective, not the job
                        raise EngineDied(message.message)
                raise _job_error(message)

    async def stop_job(self, job_id: str) -> None:
        """Ask the engine to stop `job_id` at its next step (no-op if it already ended)."""
        with contextlib.suppress(OSError, EngineDied):
            await self._send(StopJob(job_id))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ask the engine to exit after its current step, then make sure it did."""
        with contextlib.suppress(OSError, EngineDied):
            await self._send(Shutdown())
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
        await self.kill()

    async def kill(self) -> None:
        processes, self._processes = self._processes, []
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            await asyncio.to_thread(process.join, 10)
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    async def _send(self, message: Any) -> None:
        if not self._conns or not self.alive:
            raise EngineDied("the engine is not running")
        await asyncio.to_thread(self._conns[0].send, message)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_pipe(
    conn: Connection, rank: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]
) -> None:
    """Forward every message from one rank to the loop's queue; RankExited when it is gone."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = RankExited(rank)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, message)
        except RuntimeError:  # the loop closed: nobody is listening any more
            return
        if isinstance(message, RankExited):
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
