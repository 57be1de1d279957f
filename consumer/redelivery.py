"""Bounded redelivery: a record whose claim keeps failing is set aside, so its partition moves.

Owns how often one record may be fetched again after its claim raised, and what happens
then (a DLQ copy, and a best-effort `failed/internal` for a readable job id). Must never
let a record go uncommitted for ever while the broker takes writes, nor drop one unwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from i2v_fleet.schemas import ErrorCode, ErrorInfo, safe_text

from .admission import Admission, JobIdentity
from .outcome import DEAD_LETTERED, Outcome, failed

log = logging.getLogger(__name__)


class Redelivery:
    """Counts the claims of the record at the head that failed, and sets it aside in time."""

    def __init__(self, admission: Admission, tries: int, pause_s: float) -> None:
        self.admission = admission
        self.tries = tries
        self.pause_s = pause_s
        self._failures: dict[tuple[str, int, int], int] = {}

    def claimed(self) -> None:
        """A claim went through: the count starts again."""
        self._failures.clear()

    async def failed(self, record: Any, exc: Exception) -> Outcome | None:
        """After a claim raised: the record's outcome once it is dead-lettered (the caller
        commits it), None to fetch it again. Broker trouble is retried `tries` times;
        anything else would fail the same way every time, so the record is set aside at
        once. Either way no record is fetched more than `tries` times by a node that can
        write."""
        key = (record.topic, record.partition, record.offset)
        tries = self._failures.get(key, 0) + 1
        self._failures = {key: tries}  # only the record at the head matters
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        what = safe_text(f"{type(exc).__name__}: {exc}", 300)
        if broker_trouble(exc) and tries < self.tries:
            log.warning(
                "claiming %s failed (%s); fetched %d of at most %d times, trying again in %.0f s",
                where,
                what,
                tries,
                self.tries,
                self.pause_s,
            )
            return None
        if not broker_trouble(exc):
            log.error("claiming %s failed: %s", where, what, exc_info=exc)
        error = ErrorInfo.of(
            ErrorCode.INTERNAL,
            f"the node could not claim this record ({what}; fetched {tries} times); "
            "it was set aside so the partition moves on",
        )
        try:
            await self.admission.set_aside(record, error)
        except Exception as dlq_exc:
            log.warning(
                "claiming %s failed and the DLQ refused it too (%s); fetched %d times",
                where,
                safe_text(str(dlq_exc), 300),
                tries,
            )
            return None
        ident = JobIdentity.of(record.value or b"")
        if ident is not None:  # best effort: answer the submitter
            with contextlib.suppress(Exception):
                await self.admission.emitter.failed_for(ident.job_id, ident.attempt, error)
                return failed(ErrorCode.INTERNAL.value)
        return DEAD_LETTERED


def broker_trouble(exc: BaseException) -> bool:
    """True for failures of the broker or the way to it (worth retrying), not of the record."""
    from aiokafka.errors import KafkaError, KafkaTimeoutError

    if isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, KafkaError) and bool(exc.retriable)
