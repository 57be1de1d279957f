"""How the engine's failures become the node's errors: EngineDied, EngineMisconfigured, and
the JobFailed -> JobError mapping. Must never drop or rewrite what the engine reported: the
code picks the error class, and the engine's retry flag travels on the error unchanged.
"""

from __future__ import annotations

import structlog

from i2v_fleet.consumer.errors import (
    ImageRejected,
    InternalError,
    InvalidJob,
    JobError,
    OutOfMemory,
)
from i2v_fleet.schemas import ErrorCode

from .wire import JobFailed

log = structlog.get_logger(__name__)


class EngineDied(JobError):
    """The engine process exited or stopped answering; the job may run again elsewhere."""

    retryable = True


class EngineMisconfigured(Exception):
    """The engine cannot start with this node's settings; the message says what to change.
    The worker stops (exit 2) instead of restarting the engine forever."""


ENGINE_ERRORS: dict[str, type[JobError]] = {
    ErrorCode.INVALID_REQUEST: InvalidJob,
    ErrorCode.IMAGE_INVALID: ImageRejected,
    ErrorCode.OUT_OF_MEMORY: OutOfMemory,
    ErrorCode.INTERNAL: InternalError,
}
"""The codes a pipeline error can carry, each with the node error that carries it on.
tests/consumer/test_error_mapping.py proves every PipelineError lands here."""


def job_error(failed: JobFailed) -> JobError:
    """The node error for a job the engine failed: its class by the code, its retry flag the
    engine's own (an engine bug is retryable though InternalError's default is not)."""
    kind = ENGINE_ERRORS.get(failed.code)
    if kind is None:  # a pipeline code nobody mapped: still fail the job, loudly
        log.error("unmapped engine error code", code=failed.code, job_id=failed.job_id)
        return InternalError(f"{failed.code}: {failed.message}", retryable=failed.retryable)
    return kind(failed.message, retryable=failed.retryable)
