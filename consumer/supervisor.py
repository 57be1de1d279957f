"""The node supervisor: claims jobs from `i2v.requests`, runs them on the engine, reports.

Owns the claim (oldest head record first, the rest rewound; `started` acked, then the
commit), leaving the group while busy so idle nodes take the partitions, the lease
renewals, shutdown hand-back, and each job's path from input to result. A node that dies
after its claim is covered by the lease: a reaper (reaper.py) re-publishes the job.
Its loop never blocks: the engine runs in its own process, blocking I/O in threads.

Over 400 lines, knowingly: membership, admission, the job run, the hand-back policy and
the announcer still live here together. They are to become separate modules with one
shared hand-back policy (node and reaper) behind test seams; until that split, every
change here is covered by the in-process admission tests and the real-worker suites.
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
from typing import Annotated, Any
from uuid import UUID

import structlog
from aiokafka import ConsumerRebalanceListener
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from i2v_fleet.pipeline.layout import ParallelLayout
from i2v_fleet.pipeline.request import AttentionCacheSpec
from i2v_fleet.schemas import (
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
    safe_text,
    served_presets,
    utcnow,
)
from i2v_fleet.schemas.requests import check_metadata

from .broker import BrokerWatch
from .control import ControlWatcher, PeerWatcher
from .engine_host import (
    EngineDied,
    EngineHost,
    EngineMisconfigured,
    JobDone,
    JobProgress,
    RunJob,
)
from .errors import (
    Cancelled,
    Expired,
    ImageRejected,
    InternalError,
    InvalidJob,
    JobError,
    PresetUnavailable,
    StorageFailed,
    TimedOut,
    WorkerLost,
)
from .events import Emitter
from .failpoints import Failpoints
from .fetch import FetchPolicy
from .generation import check_preset, generation_request
from .inputs import image_bytes
from .metrics import Metrics
from .ops import start as start_ops
from .reaper import Reaper
from .settings import WorkerSettings
from .storage import ResultStore

log = logging.getLogger(__name__)


class _RawIdentity(BaseModel):
    """A record's job id, when the rest does not validate; its other fields unchecked."""

    model_config = ConfigDict(extra="ignore")
    job_id: UUID
    attempt: Any = 1
    metadata: Any = None


_RAW_IDENTITY = TypeAdapter(_RawIdentity)
_ATTEMPT: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(strict=True, ge=1, le=100)])
_METADATA: TypeAdapter[dict[str, str]] = TypeAdapter(
    Annotated[dict[str, str], AfterValidator(check_metadata)]
)


@dataclass(frozen=True)
class JobIdentity:
    """Who to answer for a record that is not a valid job: its id, and its attempt and
    metadata only when they pass the job's own rules (else 1 and empty), so a refusal
    never carries a field that breaks the event it goes in."""

    job_id: UUID
    attempt: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    usable: bool = True
    """False when the attempt or the metadata had to be dropped."""

    @classmethod
    def of(cls, raw: bytes) -> JobIdentity | None:
        """The identity in a record's value, or None when not even its job id is readable."""
        try:
            ident = _RAW_IDENTITY.validate_json(raw)
        except ValidationError:
            return None
        attempt, metadata, usable = 1, {}, True
        try:
            attempt = _ATTEMPT.validate_python(ident.attempt)
        except ValidationError:
            usable = False
        if ident.metadata is not None:
            try:
                metadata = _METADATA.validate_python(ident.metadata)
            except ValidationError:
                usable = False
        return cls(ident.job_id, attempt, metadata, usable)


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
    claim_tries = 5
    """Times one record may fail to be claimed for broker trouble before it is set aside."""

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
        self._claim_tries: dict[tuple[str, int, int], int] = {}
        self.broker: BrokerWatch | None = None
        """Whether the broker answers (on /readyz), once the producer runs."""
        self._stop_asked = float("inf")
        self._ops: Any = None
        self._announcer: asyncio.Task[None] | None = None
        self._job_task: asyncio.Task[None] | None = None
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
            self._stop_asked = time.monotonic()
            self._stop_deadline = self._stop_asked + self.settings.shutdown_grace
            self._stopping.set()
            self._announce_now.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()`, then hand back, close every client and return: within
        SHUTDOWN_GRACE + SHUTDOWN_HAND_BACK_S, and within a few seconds of the grace while
        the broker is lost (the running job is then left to its lease, which a reaper on
        a node that still reaches the broker will hand back)."""
        main = asyncio.create_task(self._main(), name=f"i2v-node-{self.settings.node_id}")
        limit = asyncio.create_task(self._stop_limit(), name="i2v-stop-limit")
        try:
            await asyncio.wait({main, limit}, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                log.warning(
                    "shutdown: handing back took too long (kafka broker %s): stopping now; a "
                    "running job is left to its lease",
                    "reachable" if self.broker is None or self.broker.reachable else "lost",
                )
                for task in (main, self._job_task):
                    if task is not None:
                        task.cancel()
                await asyncio.wait({main}, timeout=2.0)
        finally:
            limit.cancel()
            await self._close()
        if main.done() and not main.cancelled() and main.exception() is not None:
            raise main.exception()  # type: ignore[misc]

    async def _main(self) -> None:
        """Start the clients, the engine and the reaper, then claim until told to stop."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        s = self.settings
        kafka = s.kafka_kwargs()
        self._ops = await start_ops(self, s.server_host, s.server_port)
        self.ops_url = _url_of(self._ops, s.server_host)
        self._producer = AIOKafkaProducer(**kafka, acks="all", max_request_size=2 * 1024 * 1024)
        await self._producer.start()
        producer = self._producer
        self.broker = BrokerWatch(
            lambda: producer.client.fetch_all_metadata(), s.broker_check_s, name=s.node_id
        )
        self.broker.start()
        self.emitter = Emitter(self._producer, self.topics, s.node_id, s.progress_interval_s)
        self.control = ControlWatcher(kafka, self.topics.control)
        self.peers = PeerWatcher(kafka, self.topics.nodes, s.node_id)
        self.reaper = Reaper(s, self._producer, self.emitter, self.metrics)
        self._announcer = asyncio.create_task(self._announce(), name="i2v-node-info")
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
        self.claims = consumer
        await consumer.start()
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

    async def _stop_limit(self) -> None:
        """Return when a stopping node has had long enough to hand its job back."""
        await self._stopping.wait()
        while True:
            lost = self.broker is not None and not self.broker.reachable
            margin = 3.0 if lost else self.settings.shutdown_hand_back_s
            # Without a job there is nothing to wait for: only the clients to close.
            start = self._stop_deadline if self.stats.current is not None else self._stop_asked
            if time.monotonic() >= start + margin:
                return
            await asyncio.sleep(0.2)

    async def _close(self) -> None:
        """Close everything this lane started, each part bounded in time, all at once: a lost
        broker must not hold the node (Kafka clients wait for it when closing)."""
        self.ready.clear()
        if self._announcer is not None:
            self._announcer.cancel()
        lost = self.broker is not None and not self.broker.reachable
        parts: dict[str, Any] = {"engine": self.engine.close(timeout_s=5.0 if lost else 10.0)}
        if self.claims is not None:
            parts["claims consumer"] = self.claims.stop()  # leaves the group at once
        for name, client in (("reaper", self.reaper), ("peers", self.peers)):
            if client is not None:
                parts[name] = client.stop()
        if self.control is not None:
            parts["cancel reader"] = self.control.stop()
        await _bounded(parts, 7.0 if lost else 20.0)
        self._state, self._state_since = NodeState.STOPPED, utcnow()
        if self.emitter is not None and not lost:
            stopped = self.emitter.node_info(self._node_info(NodeState.STOPPED))
            await _bounded({"node info": stopped}, 2.0)
        last: dict[str, Any] = {}
        if self._producer is not None:
            last["producer"] = self._producer.stop()
        if self.broker is not None:
            last["broker watch"] = self.broker.stop()
        if self._ops is not None:
            last["ops server"] = self._ops.cleanup()
        await _bounded(last, 2.0 if lost else 10.0)

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
        except Exception as exc:
            if not await self._claim_failed(record, exc):
                # Leave the record uncommitted and fetch it again after a pause.
                consumer.seek(tp, record.offset)
                consumer.resume(*consumer.assignment())
                await self._pause(self.retry_pause_s)
                return
            job = None
        self._claim_tries.clear()
        await self._commit(consumer, tp, record.offset + 1)
        if job is None:  # it ended at claim (refused, cancelled, expired, already done)
            consumer.resume(*consumer.assignment())
            return
        self.failpoints.hit("after_commit")
        self.stats.current = job
        task = asyncio.create_task(self._execute(job, ref), name=f"job-{job.job_id}")
        self._job_task = task
        self._announce_now.set()  # busy: peers stop counting on this node
        await self._busy(consumer, task, waiting)
        try:
            await task
        except Exception:
            # Its final event could not be written: the lease runs out and a reaper hands
            # the job back. Pause before claiming more from a broker in that state.
            log.exception("job %s ended without a final event; its lease will expire", job.job_id)
            await self._pause(self.retry_pause_s)
        if consumer.subscription():
            consumer.resume(*consumer.assignment())
        self._announce_now.set()  # idle again: busy peers may hand their waiting records on

    async def _claim_failed(self, record: Any, exc: Exception) -> bool:
        """After a claim raised: True once the record is dead-lettered (the caller commits
        it), False to fetch it again. Broker trouble is retried `claim_tries` times; anything
        else would fail the same way every time, so the record is set aside at once. Either
        way no record is fetched more than `claim_tries` times by a node that can write."""
        key = (record.topic, record.partition, record.offset)
        tries = self._claim_tries.get(key, 0) + 1
        self._claim_tries = {key: tries}  # only the record at the head matters
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        what = safe_text(f"{type(exc).__name__}: {exc}", 300)
        if _broker_trouble(exc) and tries < self.claim_tries:
            log.warning(
                "claiming %s failed (%s); fetched %d of at most %d times, trying again in %.0f s",
                where,
                what,
                tries,
                self.claim_tries,
                self.retry_pause_s,
            )
            return False
        if not _broker_trouble(exc):
            log.error("claiming %s failed: %s", where, what, exc_info=exc)
        error = ErrorInfo.of(
            ErrorCode.INTERNAL,
            f"the node could not claim this record ({what}; fetched {tries} times); "
            "it was set aside so the partition moves on",
        )
        try:
            await self._dead_letter(record, error)
        except Exception as dlq_exc:
            log.warning(
                "claiming %s failed and the DLQ refused it too (%s); fetched %d times",
                where,
                safe_text(str(dlq_exc), 300),
                tries,
            )
            return False
        ident = JobIdentity.of(record.value or b"")
        if ident is not None and self.emitter is not None:  # best effort: answer the submitter
            with contextlib.suppress(Exception):
                await self.emitter.failed_for(ident.job_id, ident.attempt, error)
                self._ended("failed", ErrorCode.INTERNAL.value)
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep, but no longer than until the node is told to stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

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
            if self.broker is not None:
                self.broker.suspect()
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
            except EngineMisconfigured:
                raise  # the settings changed under it, or never worked: stop the node
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
        try:
            check_preset(job, distilled=self.settings.distilled)
        except PresetUnavailable as exc:
            await self._fail(job, exc)
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
        """The record's job, or None once it is answered: `failed/invalid_request` when its
        job id is readable (and a DLQ copy too when its attempt or metadata were unusable),
        else a DLQ copy alone. Every message here is escaped and cut to fit its event."""
        assert self.emitter is not None
        raw = record.value or b""
        try:
            return JOB_REQUEST_ADAPTER.validate_json(raw)
        except ValidationError as exc:
            error = ErrorInfo.of(ErrorCode.INVALID_REQUEST, describe_validation_error(exc))
        ident = JobIdentity.of(raw)
        if ident is not None:
            await self.emitter.failed_for(ident.job_id, ident.attempt, error, ident.metadata)
            self._ended("failed", ErrorCode.INVALID_REQUEST.value)
            log.info("job %s refused: %s", ident.job_id, error.message)
        if ident is None or not ident.usable:
            await self._dead_letter(record, error)
            if ident is None:
                self._ended("dead_lettered")
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
            presets=[p.value for p in served_presets(self.settings.distilled)],
            attention_backend=self.engine.ready.attention_backend if self.engine.ready else None,
        )

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
        if self.broker is not None and not self.broker.reachable:
            return  # best effort: never hold the job up waiting for a lost broker
        try:
            # The client waits for buffer space while the broker is slow or gone: bounded.
            await asyncio.wait_for(self.emitter.progress(job, phase, step, total), 2.0)
        except Exception as exc:  # progress is best effort; the final event is not
            log.warning("progress event for %s not sent: %s", job.job_id, exc or type(exc).__name__)

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

    async def _dead_letter(self, record: Any, error: ErrorInfo) -> None:
        """Copy a request record to the DLQ as it came, with why and where from."""
        assert self.emitter is not None
        origin = RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
        await self.emitter.dead_letter(
            record.value or b"", record.key, error, origin, record.timestamp
        )
        self.metrics.dead_letters.inc()
        log.warning(
            "dead-lettered %s[%s]@%s: %s",
            record.topic,
            record.partition,
            record.offset,
            error.message,
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


async def _bounded(parts: dict[str, Any], timeout_s: float) -> None:
    """Await `parts` (name -> awaitable) together for at most `timeout_s`; what fails is
    logged, what is still running then is cancelled and not waited for."""
    tasks = {asyncio.ensure_future(aw): name for name, aw in parts.items()}
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing the %s failed: %s", tasks[task], task.exception())
    for task in pending:
        log.warning("closing the %s took over %.0f s; left behind", tasks[task], timeout_s)
        task.cancel()


def _broker_trouble(exc: BaseException) -> bool:
    """True for failures of the broker or the way to it (worth retrying), not of the record."""
    from aiokafka.errors import KafkaError, KafkaTimeoutError

    if isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, KafkaError) and bool(exc.retriable)


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
