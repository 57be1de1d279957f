"""The reaper: finds jobs whose node stopped renewing its lease and hands them back.

Owns the open-job table of the `i2v.status` partitions this node is assigned in group
`i2v-reapers`: rebuilt from a bounded look-back window on assignment, kept current by
following, checked every `REAPER_INTERVAL_S`. A job whose lease ended more than
`LEASE_GRACE_S` ago (by this node's clock) is re-published to `i2v.requests` as the next
attempt first and then marked `requeued`; one out of attempts is copied to the DLQ first
and then marked `failed/worker_lost`. Either crash window duplicates, never loses.
Must never block the loop or stop following on a bad record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from aiokafka import ConsumerRebalanceListener
from pydantic import ValidationError

from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    JOB_REQUEST_ADAPTER,
    ErrorCode,
    ErrorInfo,
    HeartbeatEvent,
    JobRequest,
    RecordRef,
    RequeuedEvent,
    RequeueReason,
    StartedEvent,
    utcnow,
)

from .events import Emitter
from .handback import hand_back
from .kafka import KafkaClients
from .metrics import Metrics
from .settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class OpenJob:
    """The latest attempt of a job that has no final event yet."""

    attempt: int
    seq: int
    node_id: str
    lease_expires_at: datetime
    request: JobRequest | None = None
    ref: RecordRef | None = None

    @classmethod
    def of(cls, event: StartedEvent | HeartbeatEvent) -> OpenJob:
        """The attempt an event shows running (a heartbeat carries no request, only its ref)."""
        return cls(
            attempt=event.attempt,
            seq=event.seq,
            node_id=event.node_id,
            lease_expires_at=event.lease_expires_at,
            request=event.request if isinstance(event, StartedEvent) else None,
            ref=event.request_ref,
        )


@dataclass
class PartitionState:
    """What one owned partition of `i2v.status` says, and whether it is read to the end."""

    caught_up_at: int
    """Offset at assignment time; until the reader passes it, nothing is reaped."""
    open: dict[UUID, OpenJob] = field(default_factory=dict)
    closed: dict[UUID, float] = field(default_factory=dict)
    """Jobs with a final event (monotonic time seen): a late attempt must not reopen them."""
    caught_up: bool = False
    next_offset: int = 0
    """Where reading goes on: kept across a rebalance that leaves the partition here."""


class Reaper:
    """One node's reaper; shares the node's producer and emitter."""

    def __init__(
        self,
        settings: WorkerSettings,
        clients: KafkaClients,
        emitter: Emitter,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.clients = clients
        self.emitter = emitter
        self.metrics = metrics
        self.partitions: dict[int, PartitionState] = {}
        self.reaped = 0
        self._consumer: Any = None
        self._reader: Any = None  # a group-less consumer for request records by offset
        self._task: asyncio.Task[None] | None = None
        self._rebalancing = True
        self._hold_until = 0.0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def open_jobs(self) -> int:
        return sum(len(p.open) for p in self.partitions.values())

    async def start(self) -> None:
        s = self.settings
        self._consumer = self.clients.consumer(**s.group_member(s.reapers_group, "latest"))
        await self._consumer.start()
        self._consumer.subscribe([self.topics.status], listener=_Listener(self))
        self._task = asyncio.create_task(self._run(), name="i2v-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for consumer in (self._consumer, self._reader):
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    # -- assignment ------------------------------------------------------------------------

    async def assigned(self, tps: list[Any]) -> None:
        """Keep the table of each partition still ours; rebuild the new ones from the
        look-back window."""
        consumer = self._consumer
        owned = {tp.partition for tp in tps}
        for gone in set(self.partitions) - owned:
            del self.partitions[gone]
        ends = await consumer.end_offsets(list(tps)) if tps else {}
        for tp in tps:
            kept = self.partitions.get(tp.partition)
            if kept is not None:
                # Read on from where we were, and reap nothing there until we have read
                # what others wrote meanwhile (they may have reaped in between).
                consumer.seek(tp, kept.next_offset)
                kept.caught_up_at = ends[tp]
                kept.caught_up = kept.next_offset >= ends[tp]
        new = [tp for tp in tps if tp.partition not in self.partitions]
        if new:
            since_ms = int((time.time() - self.settings.reaper_lookback_s) * 1000)
            starts = await consumer.offsets_for_times({tp: since_ms for tp in new})
            for tp in new:
                found = starts.get(tp)
                # No record at or after that time (some brokers answer timestamp -1): the end.
                start = found.offset if found is not None and found.timestamp >= 0 else ends[tp]
                consumer.seek(tp, start)
                self.partitions[tp.partition] = PartitionState(
                    caught_up_at=ends[tp], caught_up=start >= ends[tp], next_offset=start
                )
            log.info(
                "reaper: rebuilding %s from the last %.0f s",
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in new),
                self.settings.reaper_lookback_s,
            )
        self._rebalancing = False
        self._hold_until = 0.0  # the group just said what is ours

    def revoked(self) -> None:
        """A rebalance began: reap nothing until the new assignment is known."""
        self._rebalancing = True

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        next_check = 0.0
        last_turn = time.monotonic()
        session_s = self.settings.kafka_session_timeout_ms / 1000
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
                for tp, records in batch.items():
                    state = self.partitions.get(tp.partition)
                    if state is None:
                        continue
                    for record in records:
                        self._apply(state, record)
                    state.next_offset = records[-1].offset + 1
                    if not state.caught_up and records[-1].offset + 1 >= state.caught_up_at:
                        state.caught_up = True
                        log.info(
                            "reaper: %s[%s] rebuilt, %d open jobs",
                            tp.topic,
                            tp.partition,
                            len(state.open),
                        )
                now = time.monotonic()
                if now - last_turn > session_s / 2:
                    # This process stood still (frozen, swapped out): the group may have
                    # moved our partitions meanwhile, and reaping on an old assignment
                    # would hand back jobs another reaper already handed back. Wait until
                    # the group has told us where we stand.
                    log.log(
                        logging.WARNING if now - last_turn > session_s else logging.DEBUG,
                        "reaper: stalled for %.0f s; not reaping until the group confirms "
                        "the assignment",
                        now - last_turn,
                    )
                    self._hold_until = now + session_s + 2 * self.settings.reaper_interval_s
                if now >= next_check and not self._rebalancing and now >= self._hold_until:
                    next_check = now + self.settings.reaper_interval_s
                    await self._reap_expired()
                last_turn = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A reaper that stops is a fleet that loses jobs: log, wait, go on.
                log.warning("reaper: %s; retrying", exc, exc_info=True)
                await asyncio.sleep(1.0)
                last_turn = time.monotonic()

    def _apply(self, state: PartitionState, record: Any) -> None:
        try:
            event = JOB_EVENT_ADAPTER.validate_json(record.value or b"")
        except ValidationError:
            log.warning(
                "reaper: ignoring an undecodable status record at %s@%s",
                record.partition,
                record.offset,
            )
            return
        apply_event(state, event, time.monotonic())

    async def _reap_expired(self) -> None:
        limit = utcnow() - timedelta(seconds=self.settings.lease_grace_s)
        forget_before = time.monotonic() - self.settings.reaper_lookback_s
        for state in list(self.partitions.values()):
            # Jobs closed longer ago than the look-back cannot come back: forget them.
            state.closed = {k: v for k, v in state.closed.items() if v >= forget_before}
            if not state.caught_up:
                continue
            for job_id, job in list(state.open.items()):
                if job.lease_expires_at >= limit:
                    continue
                if state.open.get(job_id) is not job:
                    continue  # changed while an earlier reap awaited
                await self._reap(job_id, job)
                state.open.pop(job_id, None)
                state.closed[job_id] = time.monotonic()

    async def _reap(self, job_id: UUID, lost: OpenJob) -> None:
        request = lost.request or await self._read_request(lost.ref)
        overdue = (utcnow() - lost.lease_expires_at).total_seconds()
        if request is None:
            log.error(
                "reaper: job %s lost its lease but its request cannot be read (%s); "
                "it cannot be re-published",
                job_id,
                lost.ref,
            )
            return
        job = request.model_copy(update={"attempt": lost.attempt})
        self.reaped += 1
        self.metrics.reaped.inc()
        error = ErrorInfo(
            code=ErrorCode.WORKER_LOST,
            message=f"node {lost.node_id} stopped renewing its lease {overdue:.0f} s ago",
            retryable=True,
        )
        log.warning(
            "reaper: job %s attempt %d lost on %s (lease ended %.0f s ago)",
            job_id,
            lost.attempt,
            lost.node_id,
            overdue,
        )
        await hand_back(
            self.emitter,
            job,
            RequeueReason.LEASE_EXPIRED,
            error,
            max_attempts=self.settings.max_attempts,
            origin=lost.ref,
            seq=lost.seq + 1,
        )

    async def _read_request(self, ref: RecordRef | None) -> JobRequest | None:
        """The request record at `ref`, or None when it is gone or does not validate."""
        if ref is None:
            return None
        from aiokafka import TopicPartition

        if self._reader is None:
            self._reader = self.clients.consumer(enable_auto_commit=False)
            await self._reader.start()
        tp = TopicPartition(ref.topic, ref.partition)
        self._reader.assign([tp])
        self._reader.seek(tp, ref.offset)
        try:
            batch = await self._reader.getmany(tp, timeout_ms=5000, max_records=1)
            records = batch.get(tp, [])
            if not records or records[0].offset != ref.offset:
                return None
            return JOB_REQUEST_ADAPTER.validate_json(records[0].value or b"")
        except ValidationError:
            return None


def apply_event(state: PartitionState, event: Any, now: float) -> None:
    """Fold one status event into the table (pure: the rules, testable without a broker)."""
    job_id = event.job_id
    if job_id in state.closed:
        return
    current = state.open.get(job_id)
    if event.type in ("succeeded", "failed", "cancelled"):
        # Whatever attempt says so, the job has its final event: nothing is left to reap.
        state.open.pop(job_id, None)
        state.closed[job_id] = now
        return
    if current is not None and event.attempt < current.attempt:
        return  # a late event of an attempt already superseded
    if isinstance(event, RequeuedEvent):
        # Re-published before this mark: the next attempt is a record in i2v.requests.
        if current is not None and current.attempt <= event.attempt:
            del state.open[job_id]
        return
    if isinstance(event, StartedEvent):
        state.open[job_id] = OpenJob.of(event)
    elif isinstance(event, HeartbeatEvent):
        if current is None or event.attempt > current.attempt:
            # Its `started` is older than the look-back window (or another attempt's):
            # the heartbeat's reference is enough to re-publish.
            state.open[job_id] = OpenJob.of(event)
        else:
            current.lease_expires_at = max(current.lease_expires_at, event.lease_expires_at)
            current.seq = max(current.seq, event.seq)
            current.node_id = event.node_id
            if current.ref is None:
                current.ref = event.request_ref


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka rebalance callbacks, handed to the reaper."""

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.reaper.revoked()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.reaper.assigned(list(assigned))
