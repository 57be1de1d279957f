"""Errors the SDK and the `i2v` command raise, mapped from the libraries below them.

    I2VError
    ├── MissingExtra       a command needs an optional extra that is not installed
    ├── InvalidJob         the job does not validate; the message names the field (ValueError)
    ├── BrokerError        Kafka could not be reached or refused a request
    │   └── TopicsError    topics could not be created or checked
    ├── JobError           the job ended without a video
    │   ├── JobFailed      a `failed` event: `.code` and `.message` say why
    │   └── JobCancelled   a `cancelled` event: `.reason`
    ├── WaitTimeout        `wait` gave up before a final event (also a TimeoutError)
    └── DevStackError      the local development stack could not start or stop

Owns the exception tree; never lets aiokafka or minio exceptions escape the public API.
"""

from __future__ import annotations

from uuid import UUID


class I2VError(Exception):
    """Base of every error raised by i2v-fleet's client side."""


class MissingExtra(I2VError):
    """A feature needs an optional extra: the message names the pip command."""

    def __init__(self, extra: str, missing: list[str], feature: str) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"{feature} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'i2v-fleet[{extra}]'"
        )


class BrokerError(I2VError):
    """Kafka could not be reached or refused a request."""


class TopicsError(BrokerError):
    """Topics could not be created or checked."""


class DevStackError(I2VError):
    """The local stack could not be started, checked or stopped."""


class InvalidJob(I2VError, ValueError):
    """The job does not validate; nothing was published."""


class JobError(I2VError):
    """The job reached a final event other than `succeeded`."""

    def __init__(self, job_id: UUID, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class JobFailed(JobError):
    """The job failed: `code` is one of the contract's error codes."""

    def __init__(self, job_id: UUID, code: str, message: str, retryable: bool) -> None:
        self.code = code
        self.retryable = retryable
        super().__init__(job_id, f"job {job_id} failed ({code}): {message}")
        self.reason = message


class JobCancelled(JobError):
    """The job was cancelled."""

    def __init__(self, job_id: UUID, reason: str | None) -> None:
        self.reason = reason
        super().__init__(job_id, f"job {job_id} was cancelled" + (f": {reason}" if reason else ""))


class WaitTimeout(I2VError, TimeoutError):
    """No final event arrived within the time `wait` was given; the job may still finish."""
