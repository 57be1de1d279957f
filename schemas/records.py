"""How an event becomes a Kafka record, how `seq` advances and how progress becomes a percent.

Owns the rules every emitter follows (the node's `Emitter` and the SDK's `FakeWorker`), so
code tested against the fake sees the records a node writes. Must never do I/O: callers send.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from ._base import SCHEMA_VERSION
from .events import JOB_EVENT_ADAPTER, EventType, JobEvent, Phase, ProgressEvent
from .nodes import NodeInfo
from .requests import JobRequest
from .topics import HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION, TopicNames

_VERSION_HEADER = (HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())

# Share of a whole job each phase stands for, to turn (phase, step) into one percentage.
_PHASE_SHARE: dict[Phase, float] = {
    Phase.LOADING_INPUTS: 2,
    Phase.ENCODING_PROMPT: 5,
    Phase.DENOISING: 80,
    Phase.DECODING: 8,
    Phase.ENCODING_VIDEO: 2,
    Phase.UPLOADING: 3,
}
_PHASE_ORDER = list(Phase)


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to send: its topic, key, value bytes and headers (UTF-8 values)."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def record_key(job_id: UUID) -> bytes:
    """The key of every record about a job, on every topic: its id as text."""
    return str(job_id).encode()


def status_record(topics: TopicNames, event: JobEvent) -> OutgoingRecord:
    """A lifecycle event on `i2v.status`, with its `type` in a header for unparsed filters."""
    return OutgoingRecord(
        topic=topics.status,
        key=record_key(event.job_id),
        value=JOB_EVENT_ADAPTER.dump_json(event),
        headers=(_VERSION_HEADER, (HEADER_EVENT_TYPE, event.type.encode())),
    )


def progress_record(topics: TopicNames, event: ProgressEvent) -> OutgoingRecord:
    """A progress event on `i2v.progress`."""
    return OutgoingRecord(
        topic=topics.progress,
        key=record_key(event.job_id),
        value=event.model_dump_json().encode(),
        headers=(_VERSION_HEADER,),
    )


def request_record(topics: TopicNames, job: JobRequest) -> OutgoingRecord:
    """A job on `i2v.requests` (a submission, or a re-publication as the next attempt)."""
    return OutgoingRecord(
        topic=topics.requests,
        key=record_key(job.job_id),
        value=job.model_dump_json().encode(),
        headers=(_VERSION_HEADER,),
    )


def node_record(topics: TopicNames, info: NodeInfo) -> OutgoingRecord:
    """A node's announcement on the compacted `i2v.nodes`, keyed by node id."""
    return OutgoingRecord(
        topic=topics.nodes,
        key=info.node_id.encode(),
        value=info.model_dump_json().encode(),
        headers=(_VERSION_HEADER,),
    )


def percent_done(phase: Phase, step: int, total: int) -> float:
    """Whole-job progress at `step` of `total` in `phase` (0-100, one decimal)."""
    index = _PHASE_ORDER.index(phase)
    before = sum(_PHASE_SHARE[p] for p in _PHASE_ORDER[:index])
    within = _PHASE_SHARE[phase] * (step / total if total else 0.0)
    return round(min(100.0, before + within), 1)


def progress_event(
    job: JobRequest, phase: Phase, step: int, total: int, eta_s: float | None = None
) -> ProgressEvent:
    """The progress event of `job` at `step` of `total` in `phase`, its percent computed."""
    return ProgressEvent(
        job_id=job.job_id,
        attempt=job.attempt,
        phase=phase,
        step=step,
        total_steps=total,
        percent=percent_done(phase, step, total),
        eta_s=eta_s,
        metadata=job.metadata,
    )


def ends_attempt(event: JobEvent) -> bool:
    """True for the last event of an attempt: a final one, or `requeued`."""
    kind = EventType(event.type)
    return kind.is_terminal() or kind is EventType.REQUEUED


class SeqCounter:
    """`seq` of one emitter's status events: 0, 1, 2, ... per job and attempt.

    Only the node holding an attempt numbers it (a reaper marking a lost attempt continues
    the holder's count explicitly), so a count is forgotten once the attempt ends.
    """

    def __init__(self) -> None:
        self._next: dict[tuple[UUID, int], int] = {}

    def next(self, job_id: UUID, attempt: int) -> int:
        """The `seq` of the attempt's next event."""
        key = (job_id, attempt)
        seq = self._next.get(key, 0)
        self._next[key] = seq + 1
        return seq

    def end(self, job_id: UUID, attempt: int) -> None:
        """Forget the attempt (its last event went out)."""
        self._next.pop((job_id, attempt), None)
