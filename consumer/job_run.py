"""One admitted attempt, from its input image to its final event: the job run.

Owns the attempt's path: load the image, run the engine (stopped on cancel, timeout or
shutdown), renew the lease, store the result (retrying a store outage), send the one event
that ends the attempt, and return that ending as an Outcome. Must never claim or commit:
the node hands it a claimed job and counts what it returns.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog

from i2v_fleet.schemas import Base64Image, JobRequest, Phase, RecordRef, RequeueReason, utcnow

from .admission import Cancels
from .announcer import Stats, versions
from .broker import BrokerWatch
from .engine import EngineDied, JobDone, JobProgress, RunJob, StopWhy
from .engine.seam import Engine
from .errors import (
    Cancelled,
    ImageRejected,
    InternalError,
    InvalidJob,
    JobError,
    StorageFailed,
    TimedOut,
)
from .events import Emitter
from .failpoints import Failpoints
from .fetch import FetchPolicy
from .generation import generation_request
from .handback import hand_back
from .inputs import image_bytes
from .metrics import Metrics
from .outcome import CANCELLED, SUCCEEDED, Ending, Outcome, failed
from .settings import WorkerSettings
from .storage import ResultStore

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """The node is stopping and the job's grace ran out: hand the job back."""


@dataclass
class JobRunner:
    """Runs claimed attempts on this lane's engine, one at a time."""

    settings: WorkerSettings
    engine: Engine
    store: ResultStore
    policy: FetchPolicy
    emitter: Emitter
    cancels: Cancels
    metrics: Metrics
    failpoints: Failpoints
    stats: Stats
    broker: BrokerWatch | None
    stop_deadline: Callable[[], float]
    """When a stopping node's grace ends (inf while it is not stopping)."""
    engine_lost: Callable[[], None]
    """Called at once when the engine dies under a job (the node stops claiming)."""
    node_cache: Any = None

    async def run(self, job: JobRequest, ref: RecordRef) -> Outcome:
        """Run one claimed attempt and turn every way it can end into exactly one event
        that ends the attempt (a final one, or `requeued`); return how it ended."""
        with structlog.contextvars.bound_contextvars(job_id=str(job.job_id), attempt=job.attempt):
            started = time.monotonic()
            self.stats.current = job
            self.metrics.in_flight.inc()
            try:
                outcome = await self._attempt(job, ref)
            except EngineDied as exc:
                log.error("engine failure during job %s: %s; restarting it", job.job_id, exc)
                self.engine_lost()
                outcome = await self._hand_back(job, RequeueReason.ENGINE_FAILURE, exc)
                await self.engine.kill()  # the node restarts it before claiming again
            except ShuttingDown:
                log.info("job %s: shutdown grace over; handing it back", job.job_id)
                outcome = await self._hand_back(job, RequeueReason.SHUTDOWN, None)
            except JobError as exc:
                outcome = await self._fail(job, exc)
            except Exception:
                log.exception("unexpected error in job %s", job.job_id)
                error = InternalError("the node hit an unexpected error; see its logs")
                outcome = await self._fail(job, error)
            finally:
                self.stats.current = None
                self.metrics.in_flight.dec()
            # The one summary line per job that operators grep for.
            log.info(
                "job done: outcome=%s size=%s frames=%d seconds=%.1f",
                outcome.label,
                job.image_size.value,
                job.num_frames,
                time.monotonic() - started,
            )
            return outcome

    async def _attempt(self, job: JobRequest, ref: RecordRef) -> Outcome:
        s = self.settings
        claimed = time.monotonic()
        heartbeats = asyncio.create_task(self._heartbeat(job, ref))
        out_dir = s.work_dir / f"{job.job_id}-{job.attempt}"
        watcher: asyncio.Task[None] | None = None
        try:
            await self.progress(job, Phase.LOADING_INPUTS, 0, 1)
            t0 = time.perf_counter()
            image = await self._load_image(job)
            timings = {"loading_inputs": time.perf_counter() - t0}
            await self.progress(job, Phase.LOADING_INPUTS, 1, 1)

            request = generation_request(job, image, node_cache=self.node_cache)
            out_dir.mkdir(parents=True, exist_ok=True)
            limit = job.timeout_s or s.task_timeout
            watcher = asyncio.create_task(self._watch(job, claimed + limit))

            async def on_progress(p: JobProgress) -> None:
                if p.phase == Phase.DENOISING and p.step >= 1:
                    self.failpoints.hit("mid_denoise")
                await self.progress(job, Phase(p.phase), p.step, p.total)

            done = await self.engine.run(
                RunJob(str(job.job_id), request, str(out_dir), job.fps), on_progress
            )
            if not isinstance(done, JobDone):
                if done.why is StopWhy.SHUTDOWN:
                    raise ShuttingDown
                if done.why is StopWhy.CANCEL:
                    await self.emitter.cancelled(job, done.reason or "cancelled")
                    return CANCELLED
                raise TimedOut(
                    f"the job ran past its timeout_s={limit} and was stopped at step "
                    f"{done.step} of {done.total_steps}; raise timeout_s or use fewer "
                    "steps or frames"
                )
            watcher.cancel()
            timings.update(done.timings)
            return await self._store(job, request, done, timings, claimed)
        except Cancelled as exc:
            await self.emitter.cancelled(job, str(exc))
            return CANCELLED
        finally:
            heartbeats.cancel()
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(shutil.rmtree, out_dir, True)

    async def _store(
        self,
        job: JobRequest,
        request: Any,
        done: JobDone,
        timings: dict[str, float],
        claimed: float,
    ) -> Outcome:
        await self.progress(job, Phase.UPLOADING, 0, 1)
        t0 = time.perf_counter()
        meta = self._meta(job, request, done, timings)
        poster = await asyncio.to_thread(Path(done.poster_path).read_bytes)
        queued = (utcnow() - job.submitted_at).total_seconds() - (time.monotonic() - claimed)
        result = await self._upload(
            job.job_id,
            Path(done.video_path),
            poster,
            meta,
            width=done.width,
            height=done.height,
            num_frames=done.num_frames,
            fps=done.fps,
            timings={
                **timings,
                "uploading": time.perf_counter() - t0,
                "queue_wait": max(0.0, queued),
                "total": time.monotonic() - claimed,
            },
        )
        self.failpoints.hit("after_upload")
        await self.progress(job, Phase.UPLOADING, 1, 1)
        await self.emitter.succeeded(job, result)
        for phase, seconds in result.timings.items():
            if phase == "queue_wait":
                self.metrics.queue_wait.observe(seconds)
            elif phase != "total":
                self.metrics.phase_seconds.labels(phase=phase).observe(seconds)
        self.metrics.uploaded_bytes.inc(result.size_bytes)
        log.info(
            "job %s succeeded: %s (%.1f s)", job.job_id, result.key, time.monotonic() - claimed
        )
        return SUCCEEDED

    async def _hand_back(
        self, job: JobRequest, reason: RequeueReason, exc: JobError | None
    ) -> Outcome:
        outcome = await hand_back(
            self.emitter,
            job,
            reason,
            exc.info() if exc is not None else None,
            max_attempts=self.settings.max_attempts,
        )
        if outcome.ending is Ending.REQUEUED:
            self.metrics.requeues.labels(reason=reason.value).inc()
        return outcome

    async def _fail(self, job: JobRequest, exc: JobError) -> Outcome:
        await self.emitter.failed(job, exc.info())
        log.info("job %s failed (%s): %s", job.job_id, exc.code.value, exc)
        return failed(exc.code.value)

    async def _load_image(self, job: JobRequest) -> Any:
        from i2v_fleet.pipeline import ImageInvalid, InvalidRequest, prepare_image

        data = await image_bytes(job.image, self.policy, self.store)
        try:
            return await asyncio.to_thread(
                prepare_image, data, job.image_size.width, job.image_size.height
            )
        except ImageInvalid as exc:
            raise ImageRejected(str(exc)) from None
        except InvalidRequest as exc:
            raise InvalidJob(str(exc)) from None

    async def _watch(self, job: JobRequest, deadline: float) -> None:
        """Ask the engine to stop at its next step once the job is cancelled, overdue, or
        the node's shutdown grace is over; the engine's answer carries why."""
        while True:
            cancel = self.cancels.cancelled(job.job_id)
            if cancel is not None:
                why, reason = StopWhy.CANCEL, cancel.reason or "cancelled"
                break
            if time.monotonic() > deadline:
                why, reason = StopWhy.TIMEOUT, ""
                break
            if time.monotonic() >= self.stop_deadline():
                why, reason = StopWhy.SHUTDOWN, ""
                break
            await asyncio.sleep(0.2)
        await self.engine.stop_job(str(job.job_id), why, reason)

    async def _heartbeat(self, job: JobRequest, ref: RecordRef) -> None:
        """Renew the lease every HEARTBEAT_S; a missed renewal is retried at the next one."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.emitter.heartbeat(job, self.settings.lease_s, ref)
            except Exception as exc:
                log.warning("lease renewal for %s not sent: %s", job.job_id, exc)

    async def _upload(
        self, job_id: UUID, video: Path, poster: bytes, meta: Any, **info: Any
    ) -> Any:
        """Store the result, retrying a store outage for UPLOAD_RETRY_S: the video is done
        and computing it again costs far more than waiting (heartbeats keep the lease)."""
        deadline = time.monotonic() + self.settings.upload_retry_s
        pause = 2.0
        while True:
            try:
                return await self.store.put_result(
                    job_id,
                    video,
                    poster,
                    meta,
                    on_video_stored=lambda: self.failpoints.hit("mid_upload"),
                    **info,
                )
            except StorageFailed as exc:
                if time.monotonic() >= self.stop_deadline():
                    raise ShuttingDown from exc
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("storing %s failed (%s); retrying in %.0f s", job_id, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def progress(self, job: JobRequest, phase: Phase, step: int, total: int) -> None:
        """Report a step (best effort: never held up by a slow or lost broker)."""
        self.stats.current_phase, self.stats.current_step = phase.value, (step, total)
        if self.broker is not None and not self.broker.reachable:
            return
        try:
            # The client waits for buffer space while the broker is slow or gone: bounded.
            await asyncio.wait_for(self.emitter.progress(job, phase, step, total), 2.0)
        except Exception as exc:  # progress is best effort; the final event is not
            log.warning("progress event for %s not sent: %s", job.job_id, exc or type(exc).__name__)

    def _meta(
        self, job: JobRequest, request: Any, done: JobDone, timings: dict[str, float]
    ) -> dict[str, Any]:
        """What `meta.json` records: the request, what actually ran, where, and how long."""
        source = job.image
        image_ref: dict[str, Any] = (
            # Decoded size from the text's length: no need to decode a MiB on the loop.
            {"base64_bytes": len(source.base64) * 3 // 4 - source.base64[-2:].count("=")}
            if isinstance(source, Base64Image)
            else source.model_dump(mode="json")
        )
        return {
            "schema_version": 1,
            "job_id": str(job.job_id),
            "attempt": job.attempt,
            "node_id": self.settings.node_id,
            "device": self.engine.device,
            "finished_at": utcnow().isoformat(),
            "request": {**job.model_dump(mode="json", exclude={"image"}), "image": image_ref},
            "parameters": {
                "width": request.width,
                "height": request.height,
                "num_frames": request.num_frames,
                "fps": done.fps,
                "infer_steps": request.infer_steps,
                "guidance_scale": request.guidance_scale,
                "sample_solver": request.solver,
                "sample_shift": request.shift,
                "seed": done.seed,
                "cache": None
                if request.cache is None
                else {"kind": type(request.cache).__name__, **vars(request.cache)},
            },
            "timings": timings,
            "versions": dict(versions()),
        }
