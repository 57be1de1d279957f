"""The node supervisor: claims jobs from `i2v.requests`, runs them on the engine, reports.

Owns the claim (oldest head record first, the rest rewound; `started` acked, then the
commit), leaving the group while busy so idle nodes take the partitions, the lease
renewals, shutdown hand-back, and each job's path from input to result. A node that dies
after its claim is covered by the lease: a reaper (reaper.py) re-publishes the job.
Its loop never blocks: the engine runs in its own process, blocking I/O in threads.
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
from aiokafka import ConsumerRebalanceListener
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pipeline.layout import ParallelLayout
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
    RecordRef,
    RequeueReason,
    describe_validation_error,
    utcnow,
)

from .control import ControlWatcher, PeerWatcher
from .engine_host import EngineDied, EngineHost, JobDone, JobProgress, RunJob
from .errors import (
    Cancelled,
    Expired,
    ImageRejected,
    InternalError,
    InvalidJob,
    JobError,
    StorageFailed,
    TimedOut,
    WorkerLost,
)
from .events import Emitter
from .failpoints import Failpoints
from .fetch import FetchPolicy
from .generation import generation_request
from .inputs import image_bytes
from .metrics import Metrics
from .ops import start as start_ops
from .reaper import Reaper
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


class ShuttingDown(Exception):
    """The node is stopping and the job's grace ran out: hand the job back."""


class Supervisor:
    """One lane of a node: one consumer-group member, one reaper and one persistent engine."""

    retry_pause_s = 5.0
    """Pause before claiming again after a job could not reach its final event."""
    inline_request_limit = 64 * 1024
    """A request record larger than this is referenced from `started`, not copied into it."""
    lag_check_s = 0.5
    """While busy and still a member: how often to look for records waiting behind the job."""
    idle_for_s = 1.0
    """A peer counts as idle once it has been `ready` this long (not between two claims)."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: EngineHost,
        store: ResultStore,
        policy: FetchPolicy,
        layout: ParallelLayout | None = None,
    ) -> None:
        self.settings = settings
        self.parallel = layout or ParallelLayout(t5_cpu=settings.t5_cpu)
        self.engine = engine
        self.store = store
        self.policy = policy
        self.topics = settings.topics
        self.stats = Stats()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_deadline = float("inf")
        self._node_cache = AttentionCacheSpec() if settings.use_attention_cache else None
        self.emitter: Emitter | None = None
        self.control: ControlWatcher | None = None
        self.peers: PeerWatcher | None = None
        self.reaper: Reaper | None = None
        self._announce_now = asyncio.Event()
        self._state = NodeState.STARTING
        self._state_since = utcnow()
        self.metrics = Metrics()
        self.failpoints = Failpoints(settings.i2v_failpoints)
        self.ops_url: str | None = None
        self._producer: Any = None
        self.claims: Any = None
        """The i2v-workers consumer, once started (its assignment is shown on /info)."""

    def claiming(self) -> list[int]:
        """The request partitions this node may claim from now (none while it is out)."""
        if self.claims is None or not self.claims.subscription():
            return []
        return sorted(tp.partition for tp in self.claims.assignment())

    def layout(self) -> Layout:
        """The layout this lane's engine runs."""
        p = self.parallel
        return Layout(
            nproc=p.nproc,
            lanes=self.settings.lanes,
            ulysses_size=p.ulysses_size,
            cfg_size=p.cfg_size,
            dit_fsdp=p.dit_fsdp,
            t5_fsdp=p.t5_fsdp,
            t5_cpu=p.t5_cpu,
            vae_parallel=p.vae_parallel,
        )

    def stop(self) -> None:
        """Stop claiming and leave the group; the running job gets SHUTDOWN_GRACE to finish,
        then stops at its next step and is handed back to the queue."""
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace
            self._stopping.set()
            self._announce_now.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        s = self.settings
        kafka = s.kafka_kwargs()
        self._producer = AIOKafkaProducer(**kafka, acks="all", max_request_size=2 * 1024 * 1024)
        await self._producer.start()
        self.emitter = Emitter(self._producer, self.topics, s.node_id, s.progress_interval_s)
        self.control = ControlWatcher(kafka, self.topics.control)
        self.peers = PeerWatcher(kafka, self.topics.nodes, s.node_id)
        self.reaper = Reaper(s, self._producer, self.emitter, self.metrics)
        consumer = None
        ops = await start_ops(self, s.server_host, s.server_port)
        self.ops_url = _url_of(ops, s.server_host)
        announcer = asyncio.create_task(self._announce(), name="i2v-node-info")
        try:
            await self.control.start()
            await self.peers.start()
            await self.store.ensure_bucket()
            await self.engine.start()
            await self.reaper.start()
            consumer = AIOKafkaConsumer(
                **kafka,
                group_id=s.workers_group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
                session_timeout_ms=s.kafka_session_timeout_ms,
                max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            )
            await consumer.start()
            self.claims = consumer
            self.ready.set()
            log.info("node %s ready, claiming from %s", s.node_id, self.topics.requests)
            while not self._stopping.is_set():
                if not self.engine.alive:
                    await self._revive_engine(consumer)
                    continue
                if not consumer.subscription():
                    consumer.subscribe([self.topics.requests], listener=_ClaimsListener())
                batch = await consumer.getmany(timeout_ms=500)
                record = _claim_oldest(consumer, batch)
                if record is None or self._stopping.is_set():
                    continue  # anything fetched was rewound by _claim_oldest
                waiting = sum(len(records) for records in batch.values()) > 1
                await self._serve(consumer, record, waiting)
        finally:
            self.ready.clear()
            announcer.cancel()
            if consumer is not None:
                await consumer.stop()  # leaves the group: partitions move at once
            await self.reaper.stop()
            await self.peers.stop()
            await self.control.stop()
            await self.engine.close()
            self._state, self._state_since = NodeState.STOPPED, utcnow()
            with contextlib.suppress(Exception):
                await self.emitter.node_info(self._node_info(NodeState.STOPPED))
            await self._producer.stop()
            await ops.cleanup()

    async def _serve(self, consumer: Any, record: Any, waiting: bool) -> None:
        """Claim one record (its first event acked, then commit), run its job outside the
        group if records wait behind it, and come back ready to claim again."""
        from aiokafka import TopicPartition

        tp = TopicPartition(record.topic, record.partition)
        consumer.pause(*consumer.assignment())
        self.failpoints.hit("before_claim")
        ref = RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
        try:
            job = await self._admit(record, ref)
        except Exception:
            # Nothing durable was written (the broker refused it, say): leave the record
            # uncommitted and fetch it again after a pause, rather than lose it.
            log.exception("claiming %s@%s failed; it will be fetched again", tp, record.offset)
            consumer.seek(tp, record.offset)
            consumer.resume(*consumer.assignment())
            await asyncio.sleep(self.retry_pause_s)
            return
        await self._commit(consumer, tp, record.offset + 1)
        if job is None:  # it ended at claim (refused, cancelled, expired, already done)
            consumer.resume(*consumer.assignment())
            return
        self.failpoints.hit("after_commit")
        self.stats.current = job
        task = asyncio.create_task(self._execute(job, ref), name=f"job-{job.job_id}")
        self._announce_now.set()  # busy: peers stop counting on this node
        await self._busy(consumer, task, waiting)
        try:
            await task
        except Exception:
            # Its final event could not be written: the lease runs out and a reaper hands
            # the job back. Pause before claiming more from a broker in that state.
            log.exception("job %s ended without a final event; its lease will expire", job.job_id)
            await asyncio.sleep(self.retry_pause_s)
        if consumer.subscription():
            consumer.resume(*consumer.assignment())
        self._announce_now.set()  # idle again: busy peers may hand their waiting records on

    async def _busy(self, consumer: Any, task: asyncio.Task[None], waiting: bool) -> None:
        """While `task` runs, stay a member with every partition paused, or leave the group
        so that idle members take the partitions (LEAVE_GROUP_WHILE_BUSY).

        `auto` leaves only when records wait behind the job and another node says it is
        idle: each leave and rejoin is a rebalance that stalls every member's fetching, so
        when nobody could take the records, staying costs nothing and leaving costs twice.
        """
        policy = self.settings.leave_group_while_busy
        leave = policy == "always" or (policy == "auto" and waiting and self._idle_peer())
        next_check = time.monotonic() + self.lag_check_s
        while not task.done():
            if (leave or self._stopping.is_set()) and consumer.subscription():
                consumer.unsubscribe()  # LeaveGroup: a rebalance hands our partitions on
                self.metrics.group_leaves.inc()
                log.info(
                    "left %s while busy: %s",
                    self.topics.requests,
                    "shutting down" if self._stopping.is_set() else "records wait behind the job",
                )
            if not consumer.subscription():
                await asyncio.wait({task}, timeout=1.0)
                continue
            # Keep polling: the group keeps a member that polls, however long the job runs.
            extra = await consumer.getmany(timeout_ms=200)
            for other, records in extra.items():  # handed to us by a rebalance meanwhile
                consumer.seek(other, records[0].offset)
            unpaused = set(consumer.assignment()) - set(consumer.paused())
            if unpaused:
                consumer.pause(*unpaused)
            if policy == "auto" and time.monotonic() >= next_check:
                leave = self._idle_peer() and await _records_waiting(consumer)
                next_check = time.monotonic() + self.lag_check_s

    def _idle_peer(self) -> bool:
        """Another node said lately that it is idle (NodeInfo `ready` on i2v.nodes)."""
        if self.peers is None:
            return False
        return bool(
            self.peers.idle_peers(
                max_age_s=3 * self.settings.node_info_interval_s, idle_for_s=self.idle_for_s
            )
        )

    async def _commit(self, consumer: Any, tp: Any, offset: int) -> None:
        from aiokafka.errors import KafkaError

        try:
            await consumer.commit({tp: offset})
        except KafkaError as exc:
            log.warning(
                "could not commit %s@%s after its claim (%s): the partition moved meanwhile, "
                "so another node may run it again; results are idempotent",
                tp,
                offset - 1,
                exc,
            )

    async def _revive_engine(self, consumer: Any) -> None:
        """Out of the group until the engine is back: a node without one must not claim."""
        self.ready.clear()
        if consumer.subscription():
            consumer.unsubscribe()
        pause = 5.0
        while not self._stopping.is_set():
            try:
                await self.engine.restart()
            except Exception as exc:
                log.error("engine restart failed (%s); trying again in %.0f s", exc, pause)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                pause = min(pause * 2, 120.0)
                continue
            self.metrics.engine_restarts.inc()
            self.ready.set()
            log.info("engine back; claiming from %s again", self.topics.requests)
            return

    # -- one record ----------------------------------------------------------------------

    async def _admit(self, record: Any, ref: RecordRef) -> JobRequest | None:
        """Decode and check a record; return its job once `started` is acked, or None once
        the job's final event is (refused, cancelled, expired, or finished before)."""
        assert self.emitter is not None
        assert self.control is not None
        job = await self._decode(record)
        if job is None:
            return None
        emitter = self.emitter
        cancel = self.control.cancelled(job.job_id)
        if cancel is not None:
            await emitter.cancelled(job, cancel.reason)
            self._ended("cancelled")
            return None
        if job.expires_at is not None and utcnow() > job.expires_at:
            waited = (utcnow() - job.submitted_at).total_seconds()
            error = Expired(
                f"the job waited {waited:.0f} s in the queue, past its ttl_s={job.ttl_s}"
            )
            await self._fail(job, error)
            return None
        previous = await self._finished_before(job)
        if previous is not None:
            # An earlier attempt finished: report it again instead of computing it again.
            await emitter.succeeded(job, await self.store.reissue(previous))
            self._ended("succeeded")
            return None
        large = len(record.value or b"") > self.inline_request_limit
        await emitter.started(job, self.settings.lease_s, ref if large else None)
        self.failpoints.hit("after_started")
        return job

    async def _finished_before(self, job: JobRequest) -> dict[str, Any] | None:
        """A finished earlier attempt's meta; None when there is none or the store is down
        (then the job runs: its upload waits for the store, the key is the same)."""
        try:
            previous = await self.store.finished(job.job_id)
        except StorageFailed as exc:
            log.warning("could not look for an earlier result of %s: %s", job.job_id, exc)
            return None
        return previous if previous is not None and "result" in previous else None

    async def _execute(self, job: JobRequest, ref: RecordRef) -> None:
        """Run one claimed attempt and turn every way it can end into exactly one event
        that ends the attempt (a final one, or `requeued`)."""
        with structlog.contextvars.bound_contextvars(job_id=str(job.job_id), attempt=job.attempt):
            before, started = dict(self.stats.outcomes), time.monotonic()
            self.metrics.in_flight.inc()
            try:
                await self._run(job, ref)
            except EngineDied as exc:
                log.error("engine failure during job %s: %s; restarting it", job.job_id, exc)
                self.ready.clear()
                await self._requeue(job, RequeueReason.ENGINE_FAILURE, exc.info())
                await self.engine.kill()  # the loop restarts it before claiming again
            except ShuttingDown:
                log.info("job %s: shutdown grace over; handing it back", job.job_id)
                await self._requeue(job, RequeueReason.SHUTDOWN, None)
            except JobError as exc:
                await self._fail(job, exc)
            except Exception:
                log.exception("unexpected error in job %s", job.job_id)
                await self._fail(
                    job, InternalError("the node hit an unexpected error; see its logs")
                )
            finally:
                self.stats.current = None
                self.metrics.in_flight.dec()
            outcome = next((k for k, v in self.stats.outcomes.items() if v != before.get(k)), "")
            # The one summary line per job that operators grep for.
            log.info(
                "job done: outcome=%s size=%s frames=%d seconds=%.1f",
                outcome or "unknown",
                job.image_size.value,
                job.num_frames,
                time.monotonic() - started,
            )

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

    async def _run(self, job: JobRequest, ref: RecordRef) -> None:
        assert self.emitter is not None
        s, emitter = self.settings, self.emitter
        claimed = time.monotonic()
        heartbeats = asyncio.create_task(self._heartbeat(job, ref))
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
                if p.phase == Phase.DENOISING and p.step >= 1:
                    self.failpoints.hit("mid_denoise")
                await self._progress(job, Phase(p.phase), p.step, p.total)

            outcome = await self.engine.run(
                RunJob(str(job.job_id), request, str(out_dir), job.fps), on_progress
            )
            if not isinstance(outcome, JobDone):
                if stop_reason.get("why") == "shutdown":
                    raise ShuttingDown
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
            result = await self._upload(
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
            self.failpoints.hit("after_upload")
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
                else NodeState.DRAINING
                if self._stopping.is_set()
                else NodeState.READY
                if self.ready.is_set()
                else NodeState.STARTING
            )
            if state is not self._state:
                self._state, self._state_since = state, utcnow()
            try:
                await self.emitter.node_info(self._node_info(state))
            except Exception as exc:
                log.warning("node info not sent: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._announce_now.wait(), self.settings.node_info_interval_s
                )
            self._announce_now.clear()

    def _node_info(self, state: NodeState) -> NodeInfo:
        outcomes = self.stats.outcomes
        return NodeInfo(
            node_id=self.settings.node_id,
            hostname=platform.node(),
            version=_versions().get("i2v-fleet", "unknown"),
            state=state,
            state_since=self._state_since,
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
            if time.monotonic() >= self._stop_deadline:
                why.update(why="shutdown")
                break
            await asyncio.sleep(0.2)
        await self.engine.stop_job(str(job.job_id))

    async def _heartbeat(self, job: JobRequest, ref: RecordRef) -> None:
        """Renew the lease every HEARTBEAT_S; a missed renewal is retried at the next one."""
        assert self.emitter is not None
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
                if time.monotonic() >= self._stop_deadline:
                    raise ShuttingDown from exc
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("storing %s failed (%s); retrying in %.0f s", job_id, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

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

    async def _requeue(
        self, job: JobRequest, reason: RequeueReason, error: ErrorInfo | None
    ) -> None:
        """Re-publish the job as the next attempt, then mark this one requeued (that order:
        a crash in between gives a duplicate attempt, never a lost job)."""
        assert self.emitter is not None
        if job.attempt >= self.settings.max_attempts:
            why = error.message if error is not None else reason.value
            lost = WorkerLost(
                f"the job's attempts ran out ({job.attempt} of MAX_ATTEMPTS="
                f"{self.settings.max_attempts}); last failure: {why}"
            )
            await self.emitter.dead_letter(
                job.model_dump_json().encode(), job.key, lost.info(), None
            )
            await self._fail(job, lost)
            return
        await self.emitter.republish(job)
        await self.emitter.requeued(job, reason, error)
        self._ended("requeued", reason.value)
        self.metrics.requeues.labels(reason=reason.value).inc()

    async def _dead_letter(self, record: Any, reason: str) -> None:
        assert self.emitter is not None
        error = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=reason, retryable=False)
        origin = RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
        await self.emitter.dead_letter(
            record.value or b"", record.key, error, origin, record.timestamp
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


class _ClaimsListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Says in the log which request partitions this node claims from after a rebalance."""

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("claiming from partitions %s", sorted(tp.partition for tp in assigned))


async def _records_waiting(consumer: Any) -> bool:
    """True when a partition of ours has records past our position (waiting behind us)."""
    from aiokafka.errors import KafkaError

    assigned = list(consumer.assignment())
    if not assigned:
        return False
    try:
        ends = await consumer.end_offsets(assigned)
        for tp in assigned:
            if ends[tp] > await asyncio.wait_for(consumer.position(tp), 2.0):
                return True
    except (KafkaError, asyncio.TimeoutError) as exc:
        log.debug("lag check failed: %s", exc)
    return False


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
