"""i2v-fleet: image-to-video generation with Wan2.1 I2V on fleets of multi-card nodes.

The one import name of the distribution. Upstream apps need only this level:

    from i2v_fleet import AsyncClient, JobRequest

The packages below it are `i2v_fleet.schemas` (the message contract), `i2v_fleet.producer_sdk`
(the client), `i2v_fleet.consumer` (the node) and `i2v_fleet.pipeline` (the engine). Names load
on first use, so `import i2v_fleet.pipeline` in an engine rank imports no Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .producer_sdk import (
        AsyncClient,
        BrokerError,
        Client,
        ClientState,
        I2VError,
        InvalidJob,
        JobCancelled,
        JobError,
        JobFailed,
        JobHandle,
        JobStatus,
        KafkaSettings,
        ObjectStoreSettings,
        QueueDepth,
        TopicSettings,
        WaitTimeout,
    )
    from .schemas import (
        JOB_EVENT_ADAPTER,
        CancelledEvent,
        ErrorCode,
        ErrorInfo,
        EventType,
        FailedEvent,
        HeartbeatEvent,
        JobEvent,
        JobRequest,
        JobResult,
        JobState,
        NodeInfo,
        Phase,
        ProgressEvent,
        QualityPreset,
        RequeuedEvent,
        S3Image,
        StartedEvent,
        SucceededEvent,
    )

_SDK = "producer_sdk"
_CONTRACT = "schemas"
_EXPORTS = {
    "JOB_EVENT_ADAPTER": _CONTRACT,
    "AsyncClient": _SDK,
    "BrokerError": _SDK,
    "CancelledEvent": _CONTRACT,
    "Client": _SDK,
    "ClientState": _SDK,
    "ErrorCode": _CONTRACT,
    "ErrorInfo": _CONTRACT,
    "EventType": _CONTRACT,
    "FailedEvent": _CONTRACT,
    "HeartbeatEvent": _CONTRACT,
    "I2VError": _SDK,
    "InvalidJob": _SDK,
    "JobCancelled": _SDK,
    "JobError": _SDK,
    "JobEvent": _CONTRACT,
    "JobFailed": _SDK,
    "JobHandle": _SDK,
    "JobRequest": _CONTRACT,
    "JobResult": _CONTRACT,
    "JobState": _CONTRACT,
    "JobStatus": _SDK,
    "KafkaSettings": _SDK,
    "NodeInfo": _CONTRACT,
    "ObjectStoreSettings": _SDK,
    "Phase": _CONTRACT,
    "ProgressEvent": _CONTRACT,
    "QualityPreset": _CONTRACT,
    "QueueDepth": _SDK,
    "RequeuedEvent": _CONTRACT,
    "S3Image": _CONTRACT,
    "StartedEvent": _CONTRACT,
    "SucceededEvent": _CONTRACT,
    "TopicSettings": _SDK,
    "WaitTimeout": _SDK,
}

__all__ = [
    "JOB_EVENT_ADAPTER",
    "AsyncClient",
    "BrokerError",
    "CancelledEvent",
    "Client",
    "ClientState",
    "ErrorCode",
    "ErrorInfo",
    "EventType",
    "FailedEvent",
    "HeartbeatEvent",
    "I2VError",
    "InvalidJob",
    "JobCancelled",
    "JobError",
    "JobEvent",
    "JobFailed",
    "JobHandle",
    "JobRequest",
    "JobResult",
    "JobState",
    "JobStatus",
    "KafkaSettings",
    "NodeInfo",
    "ObjectStoreSettings",
    "Phase",
    "ProgressEvent",
    "QualityPreset",
    "QueueDepth",
    "RequeuedEvent",
    "S3Image",
    "StartedEvent",
    "SucceededEvent",
    "TopicSettings",
    "WaitTimeout",
]


def __getattr__(name: str) -> Any:
    package = _EXPORTS.get(name)
    if package is None:
        raise AttributeError(f"module 'i2v_fleet' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{package}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
