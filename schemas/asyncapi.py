"""The AsyncAPI 3.0 document of all topics, messages, keys and headers.

Owns the machine-readable description of the contract, built from the models so it cannot
drift. Must never do I/O: callers print or write the returned dict.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .control import CancelRequest
from .events import (
    CancelledEvent,
    FailedEvent,
    HeartbeatEvent,
    ProgressEvent,
    RequeuedEvent,
    StartedEvent,
    SucceededEvent,
)
from .nodes import NodeInfo
from .requests import JobRequest
from .topics import (
    DLQ_HEADERS,
    HEADER_EVENT_TYPE,
    MESSAGE_HEADERS,
    REAPERS_GROUP,
    WORKERS_GROUP,
    TopicNames,
    topic_specs,
)

KAFKA_BINDING_VERSION = "0.5.0"

_STATUS_EVENTS: list[type[BaseModel]] = [
    StartedEvent,
    HeartbeatEvent,
    SucceededEvent,
    FailedEvent,
    CancelledEvent,
    RequeuedEvent,
]

# role -> messages carried, the key's schema, and who sends / receives it.
_CHANNELS: dict[str, dict[str, Any]] = {
    "requests": {
        "models": [JobRequest],
        "key": {"type": "string", "format": "uuid", "description": "job_id"},
        "send": ("submitJob", "Upstream services (SDK) and reapers publish jobs."),
        "receive": ("claimJob", f"Node supervisors claim jobs in group {WORKERS_GROUP}."),
    },
    "status": {
        "models": _STATUS_EVENTS,
        "key": {"type": "string", "format": "uuid", "description": "job_id"},
        "send": ("emitJobEvent", "Nodes write lifecycle events, heartbeats and results."),
        "receive": (
            "followJobEvents",
            f"Clients follow a job's partition; reapers read in group {REAPERS_GROUP}.",
        ),
    },
    "progress": {
        "models": [ProgressEvent],
        "key": {"type": "string", "format": "uuid", "description": "job_id"},
        "send": ("emitProgress", "Nodes write progress, at most 2 per second per job."),
        "receive": ("followProgress", "Clients follow a job's partition."),
    },
    "control": {
        "models": [CancelRequest],
        "key": {"type": "string", "format": "uuid", "description": "job_id"},
        "send": ("cancelJob", "Clients ask for a cancel."),
        "receive": ("readCancels", "Every node reads the whole topic, without a group."),
    },
    "dlq": {
        "models": [],
        "key": {"type": "string", "description": "the original record's key, when it had one"},
        "send": ("deadLetter", "Nodes dead-letter undecodable or abandoned requests."),
        "receive": ("inspectDeadLetters", "Operators inspect and replay."),
    },
    "nodes": {
        "models": [NodeInfo],
        "key": {"type": "string", "description": "node_id"},
        "send": ("announceNode", "Nodes write their state every 30 s."),
        "receive": ("listNodes", "`i2v nodes` and dashboards read the latest per node."),
    },
}


def _headers(role: str) -> dict[str, Any]:
    names = dict(MESSAGE_HEADERS)
    if role != "status":
        names.pop(HEADER_EVENT_TYPE)
    if role == "dlq":
        names = dict(DLQ_HEADERS)
    return {
        "type": "object",
        "properties": {k: {"type": "string", "description": v} for k, v in names.items()},
    }


def asyncapi_document(
    version: str,
    names: TopicNames | None = None,
    partitions: int = 8,
    server: str = "localhost:9092",
) -> dict[str, Any]:
    """Build the AsyncAPI 3.0 document; every `$ref` points inside it."""
    models: list[type[BaseModel]] = [m for spec in _CHANNELS.values() for m in spec["models"]]
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for spec in topic_specs(names, partitions):
        plan = _CHANNELS[spec.role]
        channel_messages: dict[str, Any] = {}
        if plan["models"]:
            for model in plan["models"]:
                name = model.__name__
                messages[name] = {
                    "name": name,
                    "title": name,
                    "summary": (model.__doc__ or "").strip().splitlines()[0],
                    "contentType": "application/json",
                    "payload": {"$ref": f"#/components/schemas/{name}"},
                    "headers": _headers(spec.role),
                    "bindings": {
                        "kafka": {"key": plan["key"], "bindingVersion": KAFKA_BINDING_VERSION}
                    },
                }
                channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        else:
            messages["DeadLetter"] = {
                "name": "DeadLetter",
                "title": "DeadLetter",
                "summary": "A request record that could not be run, with why in its headers.",
                "contentType": "application/octet-stream",
                "payload": {
                    "type": "string",
                    "format": "binary",
                    "description": "The original record's value, byte for byte.",
                },
                "headers": _headers("dlq"),
                "bindings": {
                    "kafka": {"key": plan["key"], "bindingVersion": KAFKA_BINDING_VERSION}
                },
            }
            channel_messages["DeadLetter"] = {"$ref": "#/components/messages/DeadLetter"}

        topic_config: dict[str, Any] = {
            "cleanup.policy": spec.config["cleanup.policy"].split(","),
            "retention.ms": int(spec.config["retention.ms"]),
        }
        if "max.message.bytes" in spec.config:
            topic_config["max.message.bytes"] = int(spec.config["max.message.bytes"])
        channels[spec.role] = {
            "address": spec.name,
            "title": spec.name,
            "description": f"{spec.description} Key: {spec.key}.",
            "messages": channel_messages,
            "bindings": {
                "kafka": {
                    "topic": spec.name,
                    "partitions": spec.partitions,
                    "topicConfiguration": topic_config,
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        }
        refs = [{"$ref": f"#/channels/{spec.role}/messages/{m}"} for m in channel_messages]
        for action in ("send", "receive"):
            op_id, summary = plan[action]
            operations[op_id] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{spec.role}"},
                "summary": summary,
                "messages": refs,
            }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "i2v-fleet",
            "version": version,
            "description": (
                "Image-to-video jobs over Kafka: submit to i2v.requests, follow i2v.status "
                "and i2v.progress, cancel on i2v.control. Every record is keyed by its "
                "job_id (node_id on i2v.nodes) and partitioned with murmur2, so a client "
                "can compute a job's partition and follow it alone."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": server,
                "protocol": "kafka",
                "description": "Any Kafka-compatible cluster (KAFKA_BOOTSTRAP_SERVERS).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
