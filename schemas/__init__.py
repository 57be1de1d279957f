"""The i2v-fleet message contract: every record on every topic, as pydantic v2 models.

Pure data: imports only pydantic, does no I/O. Decode records with the module-level
adapters (`JOB_REQUEST_ADAPTER.validate_json(value)`), never `json.loads` then validate.
"""

from __future__ import annotations

from pydantic import TypeAdapter

from ._base import SCHEMA_VERSION, Message, StrEnum, safe_text, utcnow
from .control import CANCEL_ADAPTER, CancelRequest
from .errors import MAX_ERROR_MESSAGE_CHARS, ErrorCode, ErrorInfo
from .events import (
    JOB_EVENT_ADAPTER,
    CancelledEvent,
    EventType,
    FailedEvent,
    HeartbeatEvent,
    JobEvent,
    JobResult,
    JobState,
    Phase,
    ProgressEvent,
    RecordRef,
    RequeuedEvent,
    RequeueReason,
    StartedEvent,
    SucceededEvent,
)
from .nodes import NODE_INFO_ADAPTER, DeviceInfo, DeviceKind, Layout, NodeInfo, NodeState
from .presets import (
    DEFAULT_FPS,
    DEFAULT_NUM_FRAMES,
    DEFAULT_SAMPLE_SHIFT,
    DISTILLED_PRESETS,
    PRESETS,
    ImageSize,
    PresetParams,
    QualityPreset,
    SampleSolver,
    served_presets,
)
from .records import (
    OutgoingRecord,
    SeqCounter,
    ends_attempt,
    node_record,
    percent_done,
    progress_event,
    progress_record,
    record_key,
    request_record,
    status_record,
)
from .requests import (
    MAX_BASE64_IMAGE_BYTES,
    NODE_LAYOUT_FIELDS,
    AttentionCache,
    Base64Image,
    CacheConfig,
    FirstBlockCache,
    ImageSource,
    JobRequest,
    NoCache,
    S3Image,
    S3Object,
    SamplingParams,
    UrlImage,
)
from .topics import (
    DLQ_HEADERS,
    REAPERS_GROUP,
    WORKERS_GROUP,
    TopicNames,
    TopicSpec,
    topic_specs,
)
from .validation import describe_validation_error

JOB_REQUEST_ADAPTER: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)
PROGRESS_ADAPTER: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)

__all__ = [
    "CANCEL_ADAPTER",
    "DEFAULT_FPS",
    "DEFAULT_NUM_FRAMES",
    "DEFAULT_SAMPLE_SHIFT",
    "DISTILLED_PRESETS",
    "DLQ_HEADERS",
    "JOB_EVENT_ADAPTER",
    "JOB_REQUEST_ADAPTER",
    "MAX_BASE64_IMAGE_BYTES",
    "MAX_ERROR_MESSAGE_CHARS",
    "NODE_INFO_ADAPTER",
    "NODE_LAYOUT_FIELDS",
    "PRESETS",
    "PROGRESS_ADAPTER",
    "REAPERS_GROUP",
    "SCHEMA_VERSION",
    "WORKERS_GROUP",
    "AttentionCache",
    "Base64Image",
    "CacheConfig",
    "CancelRequest",
    "CancelledEvent",
    "DeviceInfo",
    "DeviceKind",
    "ErrorCode",
    "ErrorInfo",
    "EventType",
    "FailedEvent",
    "FirstBlockCache",
    "HeartbeatEvent",
    "ImageSize",
    "ImageSource",
    "JobEvent",
    "JobRequest",
    "JobResult",
    "JobState",
    "Layout",
    "Message",
    "NoCache",
    "NodeInfo",
    "NodeState",
    "OutgoingRecord",
    "Phase",
    "PresetParams",
    "ProgressEvent",
    "QualityPreset",
    "RecordRef",
    "RequeueReason",
    "RequeuedEvent",
    "S3Image",
    "S3Object",
    "SampleSolver",
    "SamplingParams",
    "SeqCounter",
    "StartedEvent",
    "StrEnum",
    "SucceededEvent",
    "TopicNames",
    "TopicSpec",
    "UrlImage",
    "describe_validation_error",
    "ends_attempt",
    "node_record",
    "percent_done",
    "progress_event",
    "progress_record",
    "record_key",
    "request_record",
    "safe_text",
    "served_presets",
    "status_record",
    "topic_specs",
    "utcnow",
]
