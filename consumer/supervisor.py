"""The node supervisor: claims jobs from `i2v.requests`, runs them on the engine, reports.

Owns the claim (oldest head record first, the rest rewound), the partition pause while a
job runs, the commit after the final event, and each job's path from input to result.
Its loop never blocks: the engine runs in its own process, blocking I/O in threads.
Until leases and the reaper exist, the offset is committed only after the final event:
a node that dies mid-job leaves the record to be delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pipeline.request import AttentionCacheSpec
from schemas import (
    JOB_REQUEST_ADAPTER,
    Base64Image,
    DeviceKind,
    ErrorCode,
    ErrorInfo,
    JobRequest,
    Layout,
    NodeInfo,
    NodeState,
    Phase,
    RequeueReason,
    describe_validation_error,
    utcnow,
)
from schemas import topics as wire

from .control import ControlWatcher
from .engine_host import EngineDied, EngineHost, JobDone, JobProgress, RunJob
from .errors import (
    Cancelled,
    Expired,
    ImageRejected,
    InternalError,
    InvalidJob,
    JobError,
    TimedOut,
    WorkerLost,
)
from .events import Emitter
from .fetch import FetchPolicy
from .generation import generation_request
from .inputs import image_bytes
from .metrics import Metrics
from .ops import start as start_ops
from .settings import WorkerSettings
from .storage import ResultStore

log = logging.getLogger(__name__)


class _JobIdentity(BaseModel):
    """Just enough of a record to say which job it was, when the rest does not validate."""

    model_config = ConfigDict(extra="ignore")
    job_id: UUID
    attempt: int = 1
    metadata: dict[str, str] = {}


_IDENTITY = TypeAdapter(_JobIdentity)


@dataclass
class Stats:
    """Counters the ops endpoints and node heartbeats report."""

    outcomes: dict[str, int] = field(default_factory=dict)
    current: JobRequest | None = None
    current_phase: str = ""
    current_step: tuple[int, int] = (0, 0)
    started_at: float = field(default_factory=time.monotonic)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Supervisor:
    """One lane of a node: one consumer-group member and one persistent engine."""

    retry_pause_s = 5.0
    """Pause before claiming again after a job could not reach its final event."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: EngineHost,
        store: ResultStore,
        policy: FetchPolicy,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.policy = policy
        self.topics = settings.topics
        self.stats = Stats()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._node_cache = AttentionCacheSpec() if settings.use_attention_cache else None
        self.emitter: Emitter | None = None
        self.control: ControlWatcher | None = None
        self.metrics = Metrics()
        self.ops_url: str | None = None
        self._producer: Any = None

    def layout(self) -> Layout:
        """The layout this lane's engine actually runs (one rank until multi-card lands)."""
        return Layout(nproc=1, lanes=1, t5_cpu=self.settings.t5_cpu)

    def stop(self) -> None:
        """Stop claiming; the running job (if any) finishes first."""
        self._stopping.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        s = self.settings
        kafka = s.kafka_kwargs()
        self._producer = AIOKafkaProducer(**kafka, acks="all", max_request_size=2 * 1024 * 1024)
        await self._producer.start()
        self.emitter = Emitter(self._producer, self.topics, s.node_id, s.progress_interval_s)
        self.control = ControlWatcher(kafka, self.topics.control)
        consumer = None
        ops = await start_ops(self, s.server_host, s.server_port)
        self.ops_url = _url_of(ops, s.server_host)
        announcer = asyncio.create_task(self._announce(), name="i2v-node-info")
        try:
            await self.control.start()
            await self.store.ensure_bucket()
            await self.engine.start()
            consumer = AIOKafkaConsumer(
                self.topics.requests,
                **kafka,
                group_id=s.workers_group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
                session_timeout_ms=s.kafka_session_timeout_ms,
                max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            )
            await consumer.start()
            self.ready.set()
            log.info("node %s ready, claiming from %s", s.node_id, self.topics.requests)
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=500)
                record = _claim_oldest(consumer, batch)
                if record is not None:
                    await self._serve(consumer, record)
        finally:
            self.ready.clear()
            announcer.cancel()
            if consumer is not None:
                await consumer.stop()
            await self.control.stop()
            await self.engine.close()
            with contextlib.suppress(Exception):
                await self.emitter.node_info(self._node_info(NodeState.STOPPED))
            await self._producer.stop()
            await ops.cleanup()

    async def _serve(self, consumer: Any, record: Any) -> None:
        """Run one record's job with every partition paused, then commit past it."""
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        tp = TopicPartition(record.topic, record.partition)
        consumer.pause(*consumer.assignment())
        task = asyncio.create_task(self._handle(record), name=f"job-{record.offset}")
        while not task.done():
            # Keep polling: the group keeps a member that polls, however long the job runs.
            extra = await consumer.getmany(timeout_ms=200)
            for other, records in extra.items():  # handed to us by a rebalance meanwhile
                consumer.seek(other, records[0].offset)
            unpaused = set(consumer.assignment()) - set(consumer.paused())
            if unpaused:
                consumer.pause(*unpaused)
        try:
            await task
        except Exception:
            # The job could not reach a final event (the broker refused it, say): leave the
            # record uncommitted and fetch it again after a pause, rather than lose it.
            log.exception(
                "job at %s@%s ended without a final event; it will be claimed again",
                tp,
                record.offset,
            )
            consumer.seek(tp, record.offset)
            consumer.resume(*consumer.assignment())
            await asyncio.sleep(self.retry_pause_s)
            return
        try:
            await consumer.commit({tp: record.offset + 1})
        except KafkaError as exc:
            log.warning(
                "could not commit %s@%s after its final event (%s): the partition moved "
                "during the job, so another node may run it again; results are idempotent",
                tp,
                record.offset,
                exc,
            )
        consumer.resume(*consumer.assignment())

    # -- one record ----------------------------------------------------------------------

    async def _handle(self, record: Any) -> None:
        job = await self._decode(record)
        if job is None:
            return
        with structlog.contextvars.bound_contextvars(job_id=str(job.job_id), attempt=job.attempt):
            before, started = dict(self.stats.outcomes), time.monotonic()
            await self._attempt(job)
            outcome = next((k for k, v in self.stats.outcomes.items() if v != before.get(k)), "")
            # The one summary line per job that operators grep for.
            log.info(
                "job done: outcome=%s size=%s frames=%d seconds=%.1f",
                outcome or "unknown",
                job.image_size.value,
                job.num_frames,
                time.monotonic() - started,
            )

    async def _attempt(self, job: JobRequest) -> None:
        """Run one attempt and turn every way it can end into exactly one final event."""
        self.stats.current = job
        self.metrics.in_flight.inc()
        try:
            await self._run(job)
        except EngineDied as exc:
            log.error("engine failure during job %s: %s; restarting it", job.job_id, exc)
            await self._requeue(job, RequeueReason.ENGINE_FAILURE, exc.info())
            self.metrics.engine_restarts.inc()
            await self.engine.restart()
        except JobError as exc:
            await self._fail(job, exc)
        except Exception:
            log.exception("unexpected error in job %s", job.job_id)
            await self._fail(job, InternalError("the node hit an unexpected error; see its logs"))
        finally:
            self.stats.current = None
            self.metrics.in_flight.dec()

    async def _decode(self, record: Any) -> JobRequest | None:
        """The record's job, or None after dead-lettering or failing what cannot run."""
        assert self.emitter is not None
        try:
            return JOB_REQUEST_ADAPTER.validate_json(record.value or b"")
        except ValidationError as exc:
            reason = describe_validation_error(exc)
        try:
            ident = _IDENTITY.validate_json(record.value or b"")
        except ValidationError:
            await self._dead_letter(record, reason)
            self._ended("dead_lettered")
            self.metrics.dead_letters.inc()
            return None
        error = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=reason, retryable=False)
        await self.emitter.failed_for(ident.job_id, ident.attempt, error, ident.metadata)
        self._ended("failed", ErrorCode.INVALID_REQUEST.value)
        log.info("job %s refused: %s", ident.job_id, reason)
        return None

    async def _run(self, job: JobRequest) -> None:
        assert self.emitter is not None
        assert self.control is not None
        s, emitter = self.settings, self.emitter
        cancel = self.control.cancelled(job.job_id)
        if cancel is not None:
            await emitter.cancelled(job, cancel.reason)
            self._ended("cancelled")
            return
        if job.expires_at is not None and utcnow() > job.expires_at:
            waited = (utcnow() - job.submitted_at).total_seconds()
            raise Expired(f"the job waited {waited:.0f} s in the queue, past its ttl_s={job.ttl_s}")
        previous = await self.store.finished(job.job_id)
        if previous is not None and "result" in previous:
            # An earlier attempt finished: report it again instead of computing it again.
            await emitter.succeeded(job, await self.store.reissue(previous))
            self._ended("succeeded")
            return

        claimed = time.monotonic()
        await emitter.started(job, s.lease_s)
        heartbeats = asyncio.create_task(self._heartbeat(job))
        out_dir = s.work_dir / f"{job.job_id}-{job.attempt}"
        stop_reason: dict[str, str] = {}
        watcher: asyncio.Task[None] | None = None
        try:
            await self._progress(job, Phase.LOADING_INPUTS, 0, 1)
            t0 = time.perf_counter()
            image = await self._load_image(job)
            timings = {"loading_inputs": time.perf_counter() - t0}
            await self._progress(job, Phase.LOADING_INPUTS, 1, 1)

            request = generation_request(job, image, node_cache=self._node_cache)
            out_dir.mkdir(parents=True, exist_ok=True)
            limit = job.timeout_s or s.task_timeout
            watcher = asyncio.create_task(self._watch(job, claimed + limit, stop_reason))

            async def on_progress(p: JobProgress) -> None:
                await self._progress(job, Phase(p.phase), p.step, p.total)

            outcome = await self.engine.run(
                RunJob(str(job.job_id), request, str(out_dir), job.fps), on_progress
            )
            if not isinstance(outcome, JobDone):
                if stop_reason.get("why") == "cancel":
                    raise Cancelled(stop_reason.get("reason") or "cancelled")
                raise TimedOut(
                    f"the job ran past its timeout_s={limit} and was stopped at step "
                    f"{outcome.step} of {outcome.total_steps}; raise timeout_s or use fewer "
                    "steps or frames"
                )
            watcher.cancel()
            timings.update(outcome.timings)
            await self._progress(job, Phase.UPLOADING, 0, 1)
            t0 = time.perf_counter()
            meta = self._meta(job, request, outcome, timings)
            poster = await asyncio.to_thread(Path(outcome.poster_path).read_bytes)
            result = await self.store.put_result(
                job.job_id,
                Path(outcome.video_path),
                poster,
                meta,
                width=outcome.width,
                height=outcome.height,
                num_frames=outcome.num_frames,
                fps=outcome.fps,
                timings={
                    **timings,
                    "uploading": time.perf_counter() - t0,
                    "queue_wait": max(
                        0.0,
                        (utcnow() - job.submitted_at).total_seconds()
                        - (time.monotonic() - claimed),
                    ),
                    "total": time.monotonic() - claimed,
                },
            )
            await self._progress(job, Phase.UPLOADING, 1, 1)
            await emitter.succeeded(job, result)
            self._ended("succeeded")
            for phase, seconds in result.timings.items():
                if phase == "queue_wait":
                    self.metrics.queue_wait.observe(seconds)
                elif phase != "total":
                    self.metrics.phase_seconds.labels(phase=phase).observe(seconds)
            self.metrics.uploaded_bytes.inc(result.size_bytes)
            log.info(
                "job %s succeeded: %s (%.1f s)", job.job_id, result.key, time.monotonic() - claimed
            )
        except Cancelled as exc:
            await emitter.cancelled(job, str(exc))
            self._ended("cancelled")
        finally:
            heartbeats.cancel()
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(shutil.rmtree, out_dir, True)

    # -- helpers -----------------------------------------------------------------------

    def _ended(self, outcome: str, code: str = "") -> None:
        self.stats.count(f"{outcome}:{code}" if code else outcome)
        self.metrics.ended(outcome, code)

    async def _announce(self) -> None:
        """Write this node's NodeInfo to i2v.nodes now and every NODE_INFO_INTERVAL_S."""
        assert self.emitter is not None
        while True:
            state = (
                NodeState.BUSY
                if self.stats.current is not None
                else NodeState.READY
                if self.ready.is_set()
                else NodeState.DRAINING
                if self._stopping.is_set()
                else NodeState.STARTING
            )
            try:
                await self.emitter.node_info(self._node_info(state))
            except Exception as exc:
                log.warning("node info not sent: %s", exc)
            await asyncio.sleep(self.settings.node_info_interval_s)

    def _node_info(self, state: NodeState) -> NodeInfo:
        outcomes = self.stats.outcomes
        return NodeInfo(
            node_id=self.settings.node_id,
            hostname=platform.node(),
            version=_versions().get("i2v-fleet", "unknown"),
            state=state,
            device=DeviceKind(self.engine.device.split(":")[0] or "cpu")
            if self.engine.device
            else DeviceKind.CPU,
            layout=self.layout(),
            current_jobs=[self.stats.current.job_id] if self.stats.current else [],
            jobs_succeeded=outcomes.get("succeeded", 0),
            jobs_failed=sum(v for k, v in outcomes.items() if k.startswith("failed")),
            uptime_s=time.monotonic() - self.stats.started_at,
            ops_url=self.ops_url,
        )

    async def _load_image(self, job: JobRequest) -> Any:
        from pipeline import ImageInvalid, InvalidRequest, prepare_image

        data = await image_bytes(job.image, self.policy, self.store)
        try:
            return await asyncio.to_thread(
                prepare_image, data, job.image_size.width, job.image_size.height
            )
        except ImageInvalid as exc:
            raise ImageRejected(str(exc)) from None
        except InvalidRequest as exc:
            raise InvalidJob(str(exc)) from None

    async def _watch(self, job: JobRequest, deadline: float, why: dict[str, str]) -> None:
        """Ask the engine to stop at its next step once the job is cancelled or overdue."""
        assert self.control is not None
        while True:
            cancel = self.control.cancelled(job.job_id)
            if cancel is not None:
                why.update(why="cancel", reason=cancel.reason or "cancelled")
                break
            if time.monotonic() > deadline:
                why.update(why="timeout")
                break
            await asyncio.sleep(0.2)
        await self.engine.stop_job(str(job.job_id))

    async def _heartbeat(self, job: JobRequest) -> None:
        assert self.emitter is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(Exception):
                await self.emitter.heartbeat(job, self.settings.lease_s)

    async def _progress(self, job: JobRequest, phase: Phase, step: int, total: int) -> None:
        assert self.emitter is not None
        self.stats.current_phase, self.stats.current_step = phase.value, (step, total)
        try:
            await self.emitter.progress(job, phase, step, total)
        except Exception as exc:  # progress is best effort; the final event is not
            log.warning("progress event for %s not sent: %s", job.job_id, exc)

    async def _fail(self, job: JobRequest, exc: JobError) -> None:
        assert self.emitter is not None
        await self.emitter.failed(job, exc.info())
        self._ended("failed", exc.code.value)
        log.info("job %s failed (%s): %s", job.job_id, exc.code.value, exc)

    async def _requeue(self, job: JobRequest, reason: RequeueReason, error: ErrorInfo) -> None:
        """Re-publish the job as the next attempt, then mark this one requeued (that order:
        a crash in between gives a duplicate attempt, never a lost job)."""
        assert self.emitter is not None
        if job.attempt >= self.settings.max_attempts:
            await self._fail(
                job,
                WorkerLost(
                    f"the job's attempts ran out ({job.attempt} of MAX_ATTEMPTS="
                    f"{self.settings.max_attempts}); last failure: {error.message}"
                ),
            )
            return
        again = job.model_copy(update={"attempt": job.attempt + 1})
        await self._producer.send_and_wait(
            self.topics.requests,
            again.model_dump_json().encode(),
            key=job.key,
            headers=[(wire.HEADER_SCHEMA_VERSION, b"1")],
        )
        await self.emitter.requeued(job, reason, error)
        self._ended("requeued", reason.value)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        headers = [
            (wire.HEADER_ERROR_CODE, ErrorCode.INVALID_REQUEST.value.encode()),
            (wire.HEADER_ERROR_MESSAGE, reason[:1000].encode()),
            (wire.HEADER_ORIGINAL_TOPIC, record.topic.encode()),
            (wire.HEADER_ORIGINAL_PARTITION, str(record.partition).encode()),
            (wire.HEADER_ORIGINAL_OFFSET, str(record.offset).encode()),
            (wire.HEADER_ORIGINAL_TIMESTAMP, str(record.timestamp).encode()),
            (wire.HEADER_NODE_ID, self.settings.node_id.encode()),
            (wire.HEADER_FAILED_AT, utcnow().isoformat().encode()),
        ]
        await self._producer.send_and_wait(
            self.topics.dlq, record.value or b"", key=record.key, headers=headers
        )
        log.warning(
            "dead-lettered %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason
        )

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
            "versions": dict(_versions()),
        }


def _claim_oldest(consumer: Any, batch: dict[Any, list[Any]]) -> Any:
    """The oldest record among the partition heads fetched; every partition is rewound to
    what it has not handed out, so nothing fetched is skipped."""
    heads = [records[0] for records in batch.values() if records]
    if not heads:
        return None
    chosen = min(heads, key=lambda r: (r.timestamp, r.partition, r.offset))
    for tp, records in batch.items():
        if records:
            consumer.seek(tp, records[0].offset + (1 if records[0] is chosen else 0))
    return chosen


@functools.cache
def _versions() -> dict[str, str]:
    """Package versions, read from installed metadata once (file I/O, not per job)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("i2v-fleet", "torch", "diffusers", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _url_of(runner: Any, host: str) -> str | None:
    """The ops server's base URL as others can reach it (the bound port, a routable host)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            shown = platform.node() if host in ("0.0.0.0", "::", "") else host
            return f"http://{shown}:{address[1]}"
    return None
