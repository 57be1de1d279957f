"""Admission: what a fetched request record becomes before the node runs anything.

Owns decoding, the refusal of what is not a job, cancel-before-start, ttl, the presets this
node serves, and reporting an earlier attempt's result again. Ends in an admitted job
(`started` acked) or in the record's outcome. Must never run the engine or commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from i2v_fleet.schemas import (
    JOB_REQUEST_ADAPTER,
    CancelRequest,
    ErrorCode,
    ErrorInfo,
    JobRequest,
    RecordRef,
    describe_validation_error,
    utcnow,
)
from i2v_fleet.schemas.requests import check_metadata

from .errors import Expired, JobError, PresetUnavailable, StorageFailed
from .events import Emitter
from .generation import check_preset
from .metrics import Metrics
from .outcome import CANCELLED, DEAD_LETTERED, SUCCEEDED, Outcome, failed
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


class Cancels(Protocol):
    def cancelled(self, job_id: UUID) -> CancelRequest | None: ...


class Admission:
    """Turns request records into admitted jobs or ended records, answering each once."""

    inline_request_limit = 64 * 1024
    """A request record larger than this is referenced from `started`, not copied into it."""

    def __init__(
        self,
        emitter: Emitter,
        cancels: Cancels,
        store: ResultStore,
        metrics: Metrics,
        *,
        lease_s: float,
        distilled: bool,
    ) -> None:
        self.emitter = emitter
        self.cancels = cancels
        self.store = store
        self.metrics = metrics
        self.lease_s = lease_s
        self.distilled = distilled

    async def admit(self, record: Any) -> JobRequest | Outcome:
        """The record's job once `started` is acked, or how the record ended (refused,
        cancelled, expired, preset not served, or finished by an earlier attempt)."""
        job = await self.decode(record)
        if isinstance(job, Outcome):
            return job
        cancel = self.cancels.cancelled(job.job_id)
        if cancel is not None:
            await self.emitter.cancelled(job, cancel.reason)
            return CANCELLED
        if job.expires_at is not None and utcnow() > job.expires_at:
            waited = (utcnow() - job.submitted_at).total_seconds()
            return await self.fail(
                job,
                Expired(f"the job waited {waited:.0f} s in the queue, past its ttl_s={job.ttl_s}"),
            )
        try:
            check_preset(job, distilled=self.distilled)
        except PresetUnavailable as exc:
            return await self.fail(job, exc)
        previous = await self._finished_before(job)
        if previous is not None:
            # An earlier attempt finished: report it again instead of computing it again.
            await self.emitter.succeeded(job, await self.store.reissue(previous))
            return SUCCEEDED
        ref = RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
        large = len(record.value or b"") > self.inline_request_limit
        await self.emitter.started(job, self.lease_s, ref if large else None)
        return job

    async def decode(self, record: Any) -> JobRequest | Outcome:
        """The record's job, or its outcome once answered: `failed/invalid_request` when its
        job id is readable (and a DLQ copy too when its attempt or metadata were unusable),
        else a DLQ copy alone. Every message here is escaped and cut to fit its event."""
        raw = record.value or b""
        try:
            return JOB_REQUEST_ADAPTER.validate_json(raw)
        except ValidationError as exc:
            error = ErrorInfo.of(ErrorCode.INVALID_REQUEST, describe_validation_error(exc))
        ident = JobIdentity.of(raw)
        if ident is not None:
            await self.emitter.failed_for(ident.job_id, ident.attempt, error, ident.metadata)
            log.info("job %s refused: %s", ident.job_id, error.message)
        if ident is None or not ident.usable:
            await self.set_aside(record, error)
        return DEAD_LETTERED if ident is None else failed(ErrorCode.INVALID_REQUEST.value)

    async def fail(self, job: JobRequest, exc: JobError) -> Outcome:
        await self.emitter.failed(job, exc.info())
        log.info("job %s failed (%s): %s", job.job_id, exc.code.value, exc)
        return failed(exc.code.value)

    async def set_aside(self, record: Any, error: ErrorInfo) -> None:
        """Copy a request record to the DLQ as it came, with why and where from."""
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

    async def _finished_before(self, job: JobRequest) -> dict[str, Any] | None:
        """A finished earlier attempt's meta; None when there is none or the store is down
        (then the job runs: its upload waits for the store, the key is the same)."""
        try:
            previous = await self.store.finished(job.job_id)
        except StorageFailed as exc:
            log.warning("could not look for an earlier result of %s: %s", job.job_id, exc)
            return None
        return previous if previous is not None and "result" in previous else None
