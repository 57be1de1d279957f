"""The one hand-back policy, for a node giving back its own attempt and a reaper a lost one.

Owns the rule: attempts left -> re-publish the job as the next attempt, then mark this one
`requeued`; attempts exhausted -> the request to the DLQ and `failed/worker_lost`. Must never
decide *whether* to hand back; its callers know why the attempt cannot finish.
"""

from __future__ import annotations

import logging

from i2v_fleet.schemas import ErrorInfo, JobRequest, RecordRef, RequeueReason

from .errors import WorkerLost
from .events import Emitter
from .outcome import Ending, Outcome

log = logging.getLogger(__name__)


async def hand_back(
    emitter: Emitter,
    job: JobRequest,
    reason: RequeueReason,
    error: ErrorInfo | None,
    *,
    max_attempts: int,
    origin: RecordRef | None = None,
    seq: int | None = None,
) -> Outcome:
    """Give the attempt `job.attempt` back to the queue, or end the job when it was the last.

    The order is re-publish, then `requeued`: a crash in between duplicates an attempt and
    never loses the job (results are idempotent). `seq` continues another node's numbering
    (a reaper ending a lost attempt); `origin` is the request record, for the DLQ's headers.
    """
    if job.attempt >= max_attempts:
        why = error.message if error is not None else reason.value
        lost = WorkerLost(
            f"the job's attempts ran out ({job.attempt} of MAX_ATTEMPTS={max_attempts}); "
            f"last failure: {why}"
        ).info()
        await emitter.dead_letter(job.model_dump_json().encode(), job.key, lost, origin)
        if seq is None:
            await emitter.failed(job, lost)
        else:
            await emitter.failed_lost(job, lost, seq)
        log.warning("job %s failed (worker_lost) after %d attempts", job.job_id, job.attempt)
        return Outcome(Ending.FAILED, lost.code.value)
    await emitter.republish(job)
    await emitter.requeued(job, reason, error, seq=seq)
    log.info(
        "job %s attempt %d handed back (%s); re-published as attempt %d",
        job.job_id,
        job.attempt,
        reason.value,
        job.attempt + 1,
    )
    return Outcome(Ending.REQUEUED, reason.value)
