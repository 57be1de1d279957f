"""Lifecycle, progress and node events, keyed by job id (node id) as DESIGN section 3 says.

Owns progress throttling (at most one event per interval per job; phase changes and the
last step always go out) and acks: terminal events are awaited with acks from all in-sync
replicas before the caller moves an offset. How an event becomes a record, `seq` numbering
and percentages are the contract's (`schemas.records`), shared with the SDK's FakeWorker.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from i2v_fleet.schemas import (
    CancelledEvent,
    ErrorInfo,
    FailedEvent,
    HeartbeatEvent,
    JobRequest,
    JobResult,
    NodeInfo,
    OutgoingRecord,
    Phase,
    RecordRef,
    RequeuedEvent,
    RequeueReason,
    SeqCounter,
    StartedEvent,
    SucceededEvent,
    TopicNames,
    ends_attempt,
    node_record,
    progress_event,
    progress_record,
    request_record,
    status_record,
    utcnow,
)
from i2v_fleet.schemas.topics import (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_FAILED_AT,
    HEADER_NODE_ID,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_TIMESTAMP,
    HEADER_ORIGINAL_TOPIC,
)


class Emitter:
    """Writes one node's events through one shared aiokafka producer (acks=all)."""

    def __init__(self, producer: Any, topics: TopicNames, node_id: str, interval_s: float = 0.5):
        self.producer = producer
        self.topics = topics
        self.node_id = node_id
        self.interval_s = interval_s
        self._seq = SeqCounter()
        self._last_progress: dict[tuple[UUID, int], tuple[float, Phase]] = {}
        self._denoise_started: dict[tuple[UUID, int], float] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def started(
        self, job: JobRequest, lease_s: float, ref: RecordRef | None = None
    ) -> StartedEvent:
        """The claim: carries the request, or only `ref` when given (a large request)."""
        event = StartedEvent(
            **self._common(job),
            lease_expires_at=_lease(lease_s),
            request=None if ref is not None else job,
            request_ref=ref,
        )
        await self._status(event)
        return event

    async def heartbeat(self, job: JobRequest, lease_s: float, ref: RecordRef | None) -> None:
        event = HeartbeatEvent(
            **self._common(job), lease_expires_at=_lease(lease_s), request_ref=ref
        )
        await self._status(event)

    async def succeeded(self, job: JobRequest, result: JobResult) -> None:
        await self._status(SucceededEvent(**self._common(job), result=result))

    async def failed(self, job: JobRequest, error: ErrorInfo) -> None:
        await self._status(FailedEvent(**self._common(job), error=error))

    async def failed_for(
        self, job_id: UUID, attempt: int, error: ErrorInfo, metadata: dict[str, str] | None = None
    ) -> None:
        """A `failed` event for a record that did not validate as a job (only its id did)."""
        event = FailedEvent(
            job_id=job_id,
            seq=self._seq.next(job_id, attempt),
            node_id=self.node_id,
            attempt=attempt,
            metadata=metadata or {},
            error=error,
        )
        await self._status(event)

    async def cancelled(self, job: JobRequest, reason: str | None) -> None:
        await self._status(CancelledEvent(**self._common(job), reason=reason))

    async def requeued(
        self,
        job: JobRequest,
        reason: RequeueReason,
        error: ErrorInfo | None,
        seq: int | None = None,
    ) -> None:
        """`seq` continues another node's numbering (a reaper marking a lost attempt)."""
        event = RequeuedEvent(
            **self._common(job, seq), reason=reason, next_attempt=job.attempt + 1, error=error
        )
        await self._status(event)

    async def failed_lost(self, job: JobRequest, error: ErrorInfo, seq: int) -> None:
        """A reaper's `failed` for another node's attempt, continuing that attempt's `seq`."""
        await self._status(FailedEvent(**self._common(job, seq), error=error))

    async def republish(self, job: JobRequest) -> None:
        """Put the job back on `i2v.requests` as its next attempt (acked), before the
        caller marks this attempt `requeued`: a crash in between duplicates, never loses."""
        again = job.model_copy(update={"attempt": job.attempt + 1})
        await self._send(request_record(self.topics, again), wait=True)

    # -- progress --------------------------------------------------------------------

    async def progress(self, job: JobRequest, phase: Phase, step: int, total: int) -> None:
        """Send unless one went out for this job within the interval (phase changes and the
        last step of a phase always go out)."""
        key = (job.job_id, job.attempt)
        now = time.monotonic()
        last = self._last_progress.get(key)
        final_step = total > 0 and step >= total
        if (
            last is not None
            and last[1] == phase
            and not final_step
            and now - last[0] < self.interval_s
        ):
            return
        self._last_progress[key] = (now, phase)
        if phase is Phase.DENOISING and step == 0:
            self._denoise_started[key] = now
        event = progress_event(job, phase, step, total, self._eta(key, phase, step, total, now))
        # Not awaited for acks: a lost progress event is replaced by the next one.
        await self._send(progress_record(self.topics, event), wait=False)

    async def dead_letter(
        self,
        value: bytes,
        key: bytes | None,
        error: ErrorInfo,
        origin: RecordRef | None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Copy a record to the DLQ with why, where it came from, and who sent it."""
        headers = [
            (HEADER_ERROR_CODE, error.code.value.encode()),
            (HEADER_ERROR_MESSAGE, error.message[:1000].encode()),
            (HEADER_ORIGINAL_TOPIC, (origin.topic if origin else self.topics.requests).encode()),
            (HEADER_NODE_ID, self.node_id.encode()),
            (HEADER_FAILED_AT, utcnow().isoformat().encode()),
        ]
        if origin is not None:
            headers.append((HEADER_ORIGINAL_PARTITION, str(origin.partition).encode()))
            headers.append((HEADER_ORIGINAL_OFFSET, str(origin.offset).encode()))
        if timestamp_ms is not None:
            headers.append((HEADER_ORIGINAL_TIMESTAMP, str(timestamp_ms).encode()))
        await self.producer.send_and_wait(self.topics.dlq, value, key=key, headers=headers)

    async def node_info(self, info: NodeInfo) -> None:
        await self._send(node_record(self.topics, info), wait=True)

    # -- internals -------------------------------------------------------------------

    def _common(self, job: JobRequest, seq: int | None = None) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "seq": self._seq.next(job.job_id, job.attempt) if seq is None else seq,
            "node_id": self.node_id,
            "attempt": job.attempt,
            "metadata": job.metadata,
        }

    async def _status(self, event: Any) -> None:
        await self._send(status_record(self.topics, event), wait=True)
        if ends_attempt(event):
            key = (event.job_id, event.attempt)
            self._seq.end(*key)
            self._last_progress.pop(key, None)
            self._denoise_started.pop(key, None)

    async def _send(self, record: OutgoingRecord, wait: bool) -> None:
        send = self.producer.send_and_wait if wait else self.producer.send
        await send(record.topic, record.value, key=record.key, headers=list(record.headers))

    def _eta(
        self, key: tuple[UUID, int], phase: Phase, step: int, total: int, now: float
    ) -> float | None:
        started = self._denoise_started.get(key)
        if phase is not Phase.DENOISING or started is None or step == 0 or total == 0:
            return None
        per_step = (now - started) / step
        # Decoding and the rest cost roughly a fifth of the denoising on the real model.
        return round(per_step * (total - step) * 1.2, 1)


def _lease(lease_s: float) -> datetime:
    return utcnow() + timedelta(seconds=lease_s)
