"""The engine's rank processes: load the model once, then serve jobs that rank 0 receives.

Owns each rank's loop (commands, keep-alive, one job, its report) and how a job's error
becomes a JobFailed. Must never decide retries or talk to Kafka or S3: it reports the
pipeline's code and retry flag unchanged, and leaves the policy to the host's caller.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from i2v_fleet.consumer.logs import configure_rank
from i2v_fleet.pipeline.errors import FailedOnRank, PipelineError  # pure Python, no torch

from .faults import install_fault
from .wire import (
    EngineConfig,
    EngineFailed,
    EngineReady,
    JobDone,
    JobFailed,
    JobProgress,
    JobStopped,
    KeepAlive,
    RankInfo,
    RunJob,
    Shutdown,
    StopJob,
    StopWhy,
)

log = structlog.get_logger(__name__)


def engine_main(conn: Connection, config: EngineConfig, rank: int = 0, init: str = "") -> None:
    """Entry point of one rank: load once, then serve jobs until Shutdown."""
    _die_with_parent()
    configure_rank(config.node_id, rank)
    try:
        _serve(conn, config, rank, init)
    except Exception:  # multiprocessing would print it to stderr bare, without node or rank
        log.exception("engine rank crashed")
        raise SystemExit(1) from None


def job_failed(job_id: str, exc: BaseException) -> JobFailed:
    """The report of a job that ended in `exc`: a pipeline error keeps its code, message and
    retry flag; anything else is an engine bug, retryable (a restarted engine or another
    node may not hit it), named by its type only (its text may quote the job's prompt)."""
    if isinstance(exc, PipelineError):
        return JobFailed(job_id, exc.code, str(exc), exc.retryable)
    return JobFailed(job_id, "internal", f"engine error: {type(exc).__name__}", True)


def _serve(conn: Connection, config: EngineConfig, rank: int, init: str) -> None:
    from i2v_fleet.pipeline.parallel import RanksOutOfStep

    t0 = time.perf_counter()
    engine = _load(conn, config, rank, init)
    if engine is None:
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
        with structlog.contextvars.bound_contextvars(job_id=message.job_id):
            try:
                _run_job(engine, conn if rank == 0 else None, message, commands)
            except RanksOutOfStep as exc:
                code, text, retryable = exc.failure or ("internal", str(exc), True)
                log.error("engine ranks out of step; this rank exits", code=code, error=text)
                conn.send(JobFailed(message.job_id, code, text, retryable, fatal=True))
                os._exit(1)  # the group cannot be repaired; the host restarts every rank


def _load(conn: Connection, config: EngineConfig, rank: int, init: str) -> Any:
    """This rank's engine, or None once its load failure was reported."""
    from i2v_fleet.pipeline import BackendUnavailable, CompileFailed, ModelLoadError, WanI2V
    from i2v_fleet.pipeline.lora import parse_loras
    from i2v_fleet.pipeline.parallel import Ranks

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
        install_fault(engine, config.fault, rank)
    except Exception as exc:  # any load failure is reported, then the process exits
        settings = isinstance(exc, (BackendUnavailable, CompileFailed, ModelLoadError))
        if settings:  # what to change is in the message; a traceback would only bury it
            log.error("engine rank cannot start with these settings", error=str(exc))
        else:
            log.exception("engine rank could not load the model")
        conn.send(EngineFailed(f"rank {rank}: {type(exc).__name__}: {exc}", settings))
        return None
    return engine


def _run_job(engine: Any, conn: Connection | None, message: RunJob, commands: list[Any]) -> None:
    """One job on this rank; only rank 0 (with `conn`) reports and writes the video."""
    from i2v_fleet.pipeline import Generated, write_poster
    from i2v_fleet.pipeline.video import BackgroundMp4

    job_id = message.job_id
    honoured: list[StopJob] = []  # the stop this job ends by: the first one to arrive

    def should_stop() -> bool:
        assert conn is not None
        while conn.poll():
            incoming = conn.recv()
            if isinstance(incoming, StopJob) and incoming.job_id == job_id:
                honoured.append(incoming)
            elif isinstance(incoming, Shutdown):
                honoured.append(StopJob(job_id, StopWhy.SHUTDOWN))
                commands.append(incoming)
        return bool(honoured)

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
        _log_failure(exc)
        if conn is not None:
            conn.send(job_failed(job_id, exc))
        return
    except Exception as exc:
        _abort(mp4)
        if engine.ranks.distributed:  # a collective broke: the group is unusable
            raise _out_of_step(exc) from exc
        log.exception("engine error")
        assert conn is not None
        conn.send(job_failed(job_id, exc))
        return
    if conn is None:
        return
    if not isinstance(outcome, Generated):
        _abort(mp4)
        # Only should_stop() makes a Stopped, so a stop was honoured; SHUTDOWN is a guard.
        stop = honoured[0] if honoured else StopJob(job_id, StopWhy.SHUTDOWN)
        conn.send(
            JobStopped(
                job_id, outcome.step, outcome.total_steps, stop.why, stop.reason, outcome.timings
            )
        )
        return
    try:
        on_progress("encoding_video", 0, 1)
        t_video = time.perf_counter()
        info = mp4.finish()  # what is left to encode after the last frame was decoded
        write_poster(outcome.frames[0], poster)
        timings = {**outcome.timings, "encoding_video": time.perf_counter() - t_video}
        on_progress("encoding_video", 1, 1)
    except Exception as exc:  # rank 0 alone, after the ranks finished: keep serving
        if isinstance(exc, PipelineError):
            _log_failure(exc)
        else:
            log.exception("could not write the video")
        conn.send(job_failed(job_id, exc))
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


def _log_failure(exc: PipelineError) -> None:
    """Log a failure on the rank where it began, with a traceback when it is ours (a bug, a
    broken device); input errors need nothing here: the host's caller logs each job's end."""
    if isinstance(exc, FailedOnRank) and exc.__cause__ is None:
        return  # another rank failed and logged it; this one only agreed to stop
    cause = exc.__cause__
    if isinstance(cause, Exception) and not isinstance(cause, PipelineError):
        log.error("job failed", code=exc.code, error=str(exc), exc_info=cause)
    elif exc.code == "internal":
        log.error("job failed", code=exc.code, error=str(exc), exc_info=exc)


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


def _die_with_parent() -> None:
    """Make the kernel kill this process when its supervisor dies, even by SIGKILL: an
    orphaned engine would hold the device's memory and the next engine could not load."""
    import ctypes
    import signal
    import sys

    parent = mp.parent_process()
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(1)
