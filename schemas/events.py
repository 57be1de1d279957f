"""Lifecycle events on `i2v.status` and progress events on `i2v.progress`.

Owns the event union (decoded by one TypeAdapter) and the job state machine's vocabulary.
Must never do I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID, uuid4

from pydantic import Field, TypeAdapter, model_validator

from ._base import Message, SafeText, SchemaVersion, StrEnum, Timestamp, utcnow
from .errors import ErrorInfo
from .requests import JobRequest


class EventType(StrEnum):
    """The `type` of a `JobEvent`."""

    STARTED = "started"
    HEARTBEAT = "heartbeat"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"

    def is_terminal(self) -> bool:
        """True for the final events: a job has exactly one, and clients take the first."""
        return self in _TERMINAL


_TERMINAL = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED})


class JobState(StrEnum):
    """Where a job stands, as a client sees it from the events so far."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


class Phase(StrEnum):
    """The phases of a run, in order."""

    LOADING_INPUTS = "loading_inputs"
    ENCODING_PROMPT = "encoding_prompt"
    DENOISING = "denoising"
    DECODING = "decoding"
    ENCODING_VIDEO = "encoding_video"
    UPLOADING = "uploading"


class RequeueReason(StrEnum):
    """Why an attempt was handed back to the queue."""

    LEASE_EXPIRED = "lease_expired"
    SHUTDOWN = "shutdown"
    ENGINE_FAILURE = "engine_failure"


class RecordRef(Message):
    """Where a record lies in Kafka: enough to read it again."""

    topic: Annotated[str, Field(description="Topic name.", examples=["i2v.requests"])]
    partition: Annotated[int, Field(ge=0, description="Partition.", examples=[3])]
    offset: Annotated[int, Field(ge=0, description="Offset in the partition.", examples=[1042])]


class JobResult(Message):
    """Where the finished video is and what it is."""

    bucket: Annotated[str, Field(description="Object store bucket.", examples=["i2v-videos"])]
    key: Annotated[
        str,
        Field(
            description="Key of the MP4.",
            examples=["jobs/3f2b8c1e-1d2a-4c55-9d7e-0b1f2a3c4d5e/video.mp4"],
        ),
    ]
    url: Annotated[str, Field(description="Presigned GET URL of the MP4.")]
    url_expires_at: Annotated[Timestamp, Field(description="When `url` stops working.")]
    poster_key: Annotated[
        str | None, Field(description="Key of the JPEG poster (first frame).")
    ] = None
    size_bytes: Annotated[int, Field(ge=0, description="Size of the MP4.", examples=[2483101])]
    sha256: Annotated[
        str,
        Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the MP4, hex."),
    ]
    width: Annotated[int, Field(gt=0, description="Frame width.", examples=[1280])]
    height: Annotated[int, Field(gt=0, description="Frame height.", examples=[720])]
    num_frames: Annotated[int, Field(gt=0, description="Frames in the MP4.", examples=[81])]
    fps: Annotated[int, Field(gt=0, description="Frame rate.", examples=[16])]
    timings: Annotated[
        dict[str, float],
        Field(
            description="Seconds spent per phase, plus `queue_wait` and `total`.",
            examples=[{"denoising": 142.1, "decoding": 11.3, "total": 161.0}],
        ),
    ] = Field(default_factory=dict)


class _EventBase(Message):
    schema_version: SchemaVersion = 1
    event_id: Annotated[UUID, Field(description="Unique id of this event.")] = Field(
        default_factory=uuid4
    )
    job_id: Annotated[UUID, Field(description="The job this event is about.")]
    seq: Annotated[
        int,
        Field(ge=0, description="Monotonic per job and attempt: orders events of one attempt."),
    ]
    time: Annotated[Timestamp, Field(description="When the event was emitted.")] = Field(
        default_factory=utcnow
    )
    node_id: Annotated[
        str, Field(min_length=1, max_length=128, description="Node that emitted the event.")
    ]
    attempt: Annotated[int, Field(ge=1, description="Attempt number (1 for the first run).")]
    metadata: Annotated[dict[str, str], Field(description="The job's metadata, echoed.")] = Field(
        default_factory=dict
    )


class StartedEvent(_EventBase):
    """A node claimed the job and holds a lease on it."""

    type: Literal["started"] = "started"
    lease_expires_at: Annotated[
        Timestamp, Field(description="The lease ends here unless a heartbeat extends it.")
    ]
    request: Annotated[
        JobRequest | None,
        Field(description="The full request, so a reaper can re-publish it."),
    ] = None
    request_ref: Annotated[
        RecordRef | None,
        Field(description="Where the request record lies, when it is too large to copy."),
    ] = None

    @model_validator(mode="after")
    def _request_or_ref(self) -> StartedEvent:
        if (self.request is None) == (self.request_ref is None):
            raise ValueError("a started event carries exactly one of request and request_ref")
        return self


class HeartbeatEvent(_EventBase):
    """The node still runs the job; the lease moves forward."""

    type: Literal["heartbeat"] = "heartbeat"
    lease_expires_at: Annotated[Timestamp, Field(description="The new end of the lease.")]
    request_ref: Annotated[
        RecordRef | None,
        Field(
            description=(
                "Where this attempt's request record lies, so a reaper that did not read "
                "`started` can still re-publish the job."
            )
        ),
    ] = None


class SucceededEvent(_EventBase):
    """The video is stored; `result` says where."""

    type: Literal["succeeded"] = "succeeded"
    result: Annotated[JobResult, Field(description="The stored video.")]


class FailedEvent(_EventBase):
    """The job ended without a video; `error.code` says why."""

    type: Literal["failed"] = "failed"
    error: Annotated[ErrorInfo, Field(description="What went wrong and what to change.")]


class CancelledEvent(_EventBase):
    """The job was cancelled before it finished."""

    type: Literal["cancelled"] = "cancelled"
    reason: Annotated[
        SafeText | None, Field(max_length=500, description="The reason given with the cancel.")
    ] = None


class RequeuedEvent(_EventBase):
    """This attempt ended without a result and the job was re-published as `next_attempt`."""

    type: Literal["requeued"] = "requeued"
    reason: Annotated[RequeueReason, Field(description="Why the attempt was handed back.")]
    next_attempt: Annotated[int, Field(ge=2, description="Attempt number of the re-publication.")]
    error: Annotated[ErrorInfo | None, Field(description="What ended the attempt, when known.")] = (
        None
    )


JobEvent = Annotated[
    StartedEvent | HeartbeatEvent | SucceededEvent | FailedEvent | CancelledEvent | RequeuedEvent,
    Field(discriminator="type"),
]
"""Any event on `i2v.status`, told apart by `type`."""

JOB_EVENT_ADAPTER: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)
"""The one decoder of `i2v.status` values: `JOB_EVENT_ADAPTER.validate_json(record.value)`."""


class ProgressEvent(Message):
    """How far a running job has come. At most 2 per second per job; phase changes always."""

    schema_version: SchemaVersion = 1
    job_id: Annotated[UUID, Field(description="The job.")]
    attempt: Annotated[int, Field(ge=1, description="Attempt number.")]
    phase: Annotated[Phase, Field(description="Current phase.", examples=["denoising"])]
    step: Annotated[int, Field(ge=0, description="Steps done in this phase.", examples=[12])]
    total_steps: Annotated[
        int, Field(ge=0, description="Steps in this phase (0 when not counted).", examples=[30])
    ]
    percent: Annotated[
        float, Field(ge=0, le=100, description="Whole-job progress estimate.", examples=[41.5])
    ]
    eta_s: Annotated[
        float | None, Field(ge=0, description="Estimated seconds to the end.", examples=[95.0])
    ] = None
    time: Annotated[Timestamp, Field(description="When it was emitted.")] = Field(
        default_factory=utcnow
    )
    metadata: Annotated[dict[str, str], Field(description="The job's metadata, echoed.")] = Field(
        default_factory=dict
    )
