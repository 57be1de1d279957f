"""Stable error codes carried by `failed` events, DLQ headers and SDK exceptions.

Owns the codes and their meaning (who should retry). Must never do I/O.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ._base import Message, SafeText, StrEnum, safe_text


class ErrorCode(StrEnum):
    """Why a job failed. The strings are stable: clients switch on them."""

    INVALID_REQUEST = "invalid_request"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    IMAGE_INVALID = "image_invalid"
    EXPIRED = "expired"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_LOST = "worker_lost"
    STORAGE_FAILED = "storage_failed"
    INTERNAL = "internal"
    PRESET_UNAVAILABLE = "preset_unavailable"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def is_client_error(self) -> bool:
        """True when the submitter must change the request; resubmitting as-is fails again."""
        return self in _CLIENT_ERRORS


_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "The job's fields are invalid; the message names the field.",
    ErrorCode.IMAGE_FETCH_FAILED: "The input image could not be fetched (URL, S3 or size cap).",
    ErrorCode.IMAGE_INVALID: "The input image is not a supported, decodable picture.",
    ErrorCode.EXPIRED: "The job waited in the queue longer than its ttl_s.",
    ErrorCode.TIMEOUT: "The job ran longer than its timeout_s and was stopped.",
    ErrorCode.CANCELLED: "The job was cancelled through i2v.control.",
    ErrorCode.OUT_OF_MEMORY: "The device ran out of memory; try fewer frames or a smaller size.",
    ErrorCode.WORKER_LOST: "The nodes running the job were lost more than MAX_ATTEMPTS times.",
    ErrorCode.STORAGE_FAILED: "The video could not be stored in the object store.",
    ErrorCode.INTERNAL: "An unexpected error in the node; operators should read its logs.",
    ErrorCode.PRESET_UNAVAILABLE: (
        "The node that took the job does not serve its quality_preset (turbo runs only on "
        "nodes with distilled weights, which serve nothing else); send it to the topic of "
        "a pool that serves it."
    ),
}

_CLIENT_ERRORS = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.IMAGE_FETCH_FAILED,
        ErrorCode.IMAGE_INVALID,
        ErrorCode.PRESET_UNAVAILABLE,
    }
)


MAX_ERROR_MESSAGE_CHARS = 2000


class ErrorInfo(Message):
    """What went wrong, in words that say what to change. Never echoes secrets or input bytes."""

    code: Annotated[
        ErrorCode, Field(description="Stable error code.", examples=["invalid_request"])
    ]
    message: Annotated[
        SafeText,
        Field(
            max_length=MAX_ERROR_MESSAGE_CHARS,
            description="Human-readable explanation that says what to change.",
            examples=["num_frames must be 4n+1 between 5 and 121; got 80"],
        ),
    ]
    retryable: Annotated[
        bool,
        Field(
            default=False,
            description="True when the same request may succeed if submitted again later.",
        ),
    ]

    @classmethod
    def of(cls, code: ErrorCode, message: str, retryable: bool = False) -> ErrorInfo:
        """An `ErrorInfo` that cannot fail to build: `message` is escaped and cut to fit.

        Nodes build every error they send this way, since messages may quote input.
        """
        return cls(
            code=code, message=safe_text(message, MAX_ERROR_MESSAGE_CHARS), retryable=retryable
        )
