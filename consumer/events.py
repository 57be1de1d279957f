"""Lifecycle, progress and node events, keyed by job id (node id) as DESIGN section 3 says.

Owns numbering (`seq` per job and attempt), progress throttling (at most one event per
interval per job; phase changes and the last step always go out) and acks: terminal
events are awaited with acks from all in-sync replicas before the caller moves an offset.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    CancelledEvent,
    ErrorInfo,
    FailedEvent,
    HeartbeatEvent,
    JobRequest,
    JobResult,
    NodeInfo,
    Phase,
    ProgressEvent,
    RecordRef,
    RequeuedEvent,
    RequeueReason,
    StartedEvent,
    SucceededEvent,
    TopicNames,
    utcnow,
)
from i2v_fleet.schemas.topics import (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_EVENT_TYPE,
    HEADER_FAILED_AT,
    HEADER_NODE_ID,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_TIMESTAMP,
    HEADER_ORIGINAL_TOPIC,
    HEADER_SCHEMA_VERSION,
)

# Share of a whole job each phase stands for, to turn (phase, step) into one percentage.
_PHASE_SHARE: dict[Phase, float] = {
    Phase.LOADING_INPUTS: 2,
    Phase.ENCODING_PROMPT: 5,
    Phase.DENOISING: 80,
    Phase.DECODING: 8,
    Phase.ENCODING_VIDEO: 2,
    Phase.UPLOADING: 3,
}


def percent_done(phase: Phase, step: int, total: int) -> float:
    before = sum(
        share
        for p, share in _PHASE_SHARE.items()
        if list(Phase).index(p) < list(Phase).index(phase)
    )
    within = _PHASE_SHARE[phase] * (step / total if total else 0.0)
    return round(min(100.0, before + within), 1)


class Emitter:
    """Writes one node's events through one shared aiokafka producer (acks=all)."""

    def __init__(self, producer: Any, topics: TopicNames, node_id: str, interval_s: float = 0.5):
        self.producer = producer
        self.topics = topics
        self.node_id = node_id
        self.interval_s = interval_s
        self._seq: dict[tuple[UUID, int], int] = {}
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
        await self._status(SucceededEvent(**self._common(job), result=result), final=True)

    async def failed(self, job: JobRequest, error: ErrorInfo) -> None:
        await self._status(FailedEvent(**self._common(job), error=error), final=True)

    async def failed_for(
        self, job_id: UUID, attempt: int, error: ErrorInfo, metadata: dict[str, str] | None = None
    ) -> None:
        """A `failed` event for a record that did not validate as a job (only its id did)."""
        key = (job_id, attempt)
        event = FailedEvent(
            job_id=job_id,
            seq=self._next(key),
            node_id=self.node_id,
            attempt=attempt,
            metadata=metadata or {},
            error=error,
        )
        await self._status(event, final=True)

    async def cancelled(self, job: JobRequest, reason: str | None) -> None:
        await self._status(CancelledEvent(**self._common(job), reason=reason), final=True)

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
        await self._status(event, final=True)

    async def failed_lost(self, job: JobRequest, error: ErrorInfo, seq: int) -> None:
        """A reaper's `failed` for another node's attempt, continuing that attempt's `seq`."""
        await self._status(FailedEvent(**self._common(job, seq), error=error), final=True)

    async def republish(self, job: JobRequest) -> None:
        """Put the job back on `i2v.requests` as its next attempt (acked), before the
        caller marks this attempt `requeued`: a crash in between duplicates, never loses."""
        again = job.model_copy(update={"attempt": job.attempt + 1})
        await self.producer.send_and_wait(
            self.topics.requests,
            again.model_dump_json().encode(),
            key=job.key,
            headers=[(HEADER_SCHEMA_VERSION, b"1")],
        )

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
        event = ProgressEvent(
            job_id=job.job_id,
            attempt=job.attempt,
            phase=phase,
            step=step,
            total_steps=total,
            percent=percent_done(phase, step, total),
            eta_s=self._eta(key, phase, step, total, now),
            metadata=job.metadata,
        )
        await self.producer.send(
            self.topics.progress,
            event.model_dump_json().encode(),
            key=job.key,
            headers=[(HEADER_SCHEMA_VERSION, b"1")],
        )

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
        await self.producer.send_and_wait(
            self.topics.nodes,
            info.model_dump_json().encode(),
            key=info.node_id.encode(),
            headers=[(HEADER_SCHEMA_VERSION, b"1")],
        )

    # -- internals -------------------------------------------------------------------

    def _common(self, job: JobRequest, seq: int | None = None) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "seq": self._next((job.job_id, job.attempt)) if seq is None else seq,
            "node_id": self.node_id,
            "attempt": job.attempt,
            "metadata": job.metadata,
        }

    def _next(self, key: tuple[UUID, int]) -> int:
        seq = self._seq.get(key, 0)
        self._seq[key] = seq + 1
        return seq

    async def _status(self, event: Any, final: bool = False) -> None:
        await self.producer.send_and_wait(
            self.topics.status,
            JOB_EVENT_ADAPTER.dump_json(event),
            key=str(event.job_id).encode(),
            headers=[(HEADER_SCHEMA_VERSION, b"1"), (HEADER_EVENT_TYPE, event.type.encode())],
        )
        if final:
            key = (event.job_id, event.attempt)
            for table in (self._seq, self._last_progress, self._denoise_started):
                table.pop(key, None)

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
