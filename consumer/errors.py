"""Errors a job can end with on a node, each carrying its contract code and retry policy.

Owns the mapping from failures to the stable `ErrorCode`s. The supervisor decides to fail,
retry or dead-letter from `code` and `retryable`, never from an isinstance ladder. Input
errors (the submitter must change something) and infrastructure errors are separate.
"""

from __future__ import annotations

from typing import ClassVar

from i2v_fleet.schemas import ErrorCode, ErrorInfo


class JobError(Exception):
    """Base of every job-ending error. Messages say what to change and never echo secrets."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        super().__init__(*args)
        if retryable is not None:
            # One failure's own verdict where its source knows better than the class (the
            # engine says whether a retry may help); as in pipeline.errors.FailedOnRank.
            self.retryable = retryable  # type: ignore[misc]

    def info(self) -> ErrorInfo:
        """The error as it travels in a `failed` event."""
        return ErrorInfo(code=self.code, message=str(self)[:2000], retryable=self.retryable)


# -- input errors: the submitter must change the job ----------------------------------


class InvalidJob(JobError):
    code = ErrorCode.INVALID_REQUEST


class ImageFetchFailed(JobError):
    code = ErrorCode.IMAGE_FETCH_FAILED


class ImageRejected(JobError):
    code = ErrorCode.IMAGE_INVALID


class Expired(JobError):
    code = ErrorCode.EXPIRED


class PresetUnavailable(JobError):
    """The node's weights do not serve the job's preset (turbo needs distilled weights,
    which serve nothing else): the job belongs on another pool's topic."""

    code = ErrorCode.PRESET_UNAVAILABLE


# -- run-time outcomes -----------------------------------------------------------------


class TimedOut(JobError):
    code = ErrorCode.TIMEOUT


class Cancelled(JobError):
    code = ErrorCode.CANCELLED


# -- infrastructure errors: the node or its dependencies failed -----------------------


class StorageFailed(JobError):
    code = ErrorCode.STORAGE_FAILED
    retryable = True


class OutOfMemory(JobError):
    code = ErrorCode.OUT_OF_MEMORY
    retryable = True


class WorkerLost(JobError):
    code = ErrorCode.WORKER_LOST


class InternalError(JobError):
    code = ErrorCode.INTERNAL
