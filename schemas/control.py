"""`CancelRequest`, the message on the compacted `i2v.control` topic.

Owns the shape of a cancel. Must never do I/O.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import Field, TypeAdapter

from ._base import Message, SafeText, SchemaVersion, Timestamp, utcnow


class CancelRequest(Message):
    """Ask for a job to stop: queued jobs are cancelled at claim, running ones at the next step."""

    schema_version: SchemaVersion = 1
    job_id: Annotated[UUID, Field(description="The job to cancel; also the record key.")]
    requested_at: Annotated[Timestamp, Field(description="When the cancel was asked for.")] = Field(
        default_factory=utcnow
    )
    reason: Annotated[
        SafeText | None,
        Field(
            max_length=500,
            description="Why; echoed in the `cancelled` event.",
            examples=["user pressed stop"],
        ),
    ] = None
    requested_by: Annotated[
        str | None,
        Field(
            max_length=128,
            description="Who asked (service or user name).",
            examples=["web-frontend"],
        ),
    ] = None


CANCEL_ADAPTER: TypeAdapter[CancelRequest] = TypeAdapter(CancelRequest)
