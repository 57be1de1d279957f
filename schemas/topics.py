"""Topic names, their settings, consumer groups and record headers (DESIGN section 3).

Owns the wire layout every producer and consumer agrees on. Must never do I/O.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ._base import Message

DAY_MS = 24 * 60 * 60 * 1000

WORKERS_GROUP = "i2v-workers"
"""Consumer group of the node supervisors on `i2v.requests`."""

REAPERS_GROUP = "i2v-reapers"
"""Consumer group of the reapers on `i2v.status`."""

# Record headers. Values are UTF-8 strings.
HEADER_SCHEMA_VERSION = "i2v-schema-version"
HEADER_EVENT_TYPE = "i2v-event-type"
HEADER_ERROR_CODE = "i2v-error-code"
HEADER_ERROR_MESSAGE = "i2v-error-message"
HEADER_ORIGINAL_TOPIC = "i2v-original-topic"
HEADER_ORIGINAL_PARTITION = "i2v-original-partition"
HEADER_ORIGINAL_OFFSET = "i2v-original-offset"
HEADER_ORIGINAL_TIMESTAMP = "i2v-original-timestamp"
HEADER_NODE_ID = "i2v-node-id"
HEADER_FAILED_AT = "i2v-failed-at"

MESSAGE_HEADERS: dict[str, str] = {
    HEADER_SCHEMA_VERSION: 'Schema version of the value ("1").',
    HEADER_EVENT_TYPE: "On i2v.status: the event's `type`, so readers can filter unparsed.",
}
DLQ_HEADERS: dict[str, str] = {
    HEADER_ERROR_CODE: "Stable error code (see ErrorCode).",
    HEADER_ERROR_MESSAGE: "Why the record was dead-lettered.",
    HEADER_ORIGINAL_TOPIC: "Topic the record came from.",
    HEADER_ORIGINAL_PARTITION: "Its partition, decimal.",
    HEADER_ORIGINAL_OFFSET: "Its offset, decimal.",
    HEADER_ORIGINAL_TIMESTAMP: "Its timestamp, epoch milliseconds.",
    HEADER_NODE_ID: "Node that dead-lettered it.",
    HEADER_FAILED_AT: "When, RFC 3339.",
}


class TopicNames(Message):
    """The six topic names (configurable with I2V_TOPIC_<ROLE>)."""

    requests: Annotated[str, Field(description="Jobs to run.")] = "i2v.requests"
    status: Annotated[str, Field(description="Lifecycle events.")] = "i2v.status"
    progress: Annotated[str, Field(description="Progress events.")] = "i2v.progress"
    control: Annotated[str, Field(description="Cancels (compacted).")] = "i2v.control"
    dlq: Annotated[str, Field(description="Dead letters.")] = "i2v.requests.dlq"
    nodes: Annotated[str, Field(description="Node heartbeats (compacted).")] = "i2v.nodes"

    def with_suffix(self, suffix: str) -> TopicNames:
        """The same names with a suffix: isolates tests or tenants on one cluster."""
        return TopicNames(**{role: f"{name}{suffix}" for role, name in self})


class TopicSpec(Message):
    """One topic as the contract defines it."""

    role: str
    name: str
    key: str
    message: str
    description: str
    config: dict[str, str]
    partitions: int


def topic_specs(names: TopicNames | None = None, partitions: int = 8) -> list[TopicSpec]:
    """Every topic with its key, message and settings, for creation and documentation.

    The compacted topics also delete after a retention period: a cancel or a node record
    older than any job that could still be queued is of no use to anyone.
    """
    n = names or TopicNames()
    return [
        TopicSpec(
            role="requests",
            name=n.requests,
            key="job_id",
            message="JobRequest",
            description="Jobs to run; consumed by node supervisors in group i2v-workers.",
            config={
                "cleanup.policy": "delete",
                "retention.ms": str(7 * DAY_MS),
                "max.message.bytes": str(2 * 1024 * 1024),
            },
            partitions=partitions,
        ),
        TopicSpec(
            role="status",
            name=n.status,
            key="job_id",
            message="JobEvent",
            description=(
                "Lifecycle events, heartbeats and results; read by clients and by the "
                "reapers in group i2v-reapers."
            ),
            config={
                "cleanup.policy": "delete",
                "retention.ms": str(7 * DAY_MS),
                "max.message.bytes": str(2 * 1024 * 1024),
            },
            partitions=partitions,
        ),
        TopicSpec(
            role="progress",
            name=n.progress,
            key="job_id",
            message="ProgressEvent",
            description="Per-step progress, at most 2 per second per job.",
            config={"cleanup.policy": "delete", "retention.ms": str(1 * DAY_MS)},
            partitions=partitions,
        ),
        TopicSpec(
            role="control",
            name=n.control,
            key="job_id",
            message="CancelRequest",
            description="Cancels; every node reads it from the start, without a group.",
            config={"cleanup.policy": "compact,delete", "retention.ms": str(7 * DAY_MS)},
            partitions=partitions,
        ),
        TopicSpec(
            role="dlq",
            name=n.dlq,
            key="original key",
            message="DeadLetter",
            description="Undecodable or abandoned requests: original bytes plus error headers.",
            config={
                "cleanup.policy": "delete",
                "retention.ms": str(14 * DAY_MS),
                "max.message.bytes": str(2 * 1024 * 1024),
            },
            partitions=partitions,
        ),
        TopicSpec(
            role="nodes",
            name=n.nodes,
            key="node_id",
            message="NodeInfo",
            description="Node heartbeats every 30 s; the fleet view.",
            config={"cleanup.policy": "compact,delete", "retention.ms": str(7 * DAY_MS)},
            partitions=1,
        ),
    ]
