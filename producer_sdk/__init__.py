"""The i2v-fleet client library: connection settings, topic administration, the `i2v` CLI.

Upstream services use it to publish jobs and follow them. It depends on `schemas` only
among our packages and never on torch.
"""

from __future__ import annotations

from i2v_fleet.connection import KafkaSettings, ObjectStoreSettings, TopicSettings

from .client import AsyncClient, ClientState, JobHandle, JobStatus, QueueDepth
from .errors import (
    BrokerError,
    DevStackError,
    I2VError,
    InvalidJob,
    JobCancelled,
    JobError,
    JobFailed,
    MissingExtra,
    TopicsError,
    WaitTimeout,
)
from .sync import Client
from .transport import KafkaTransport, Record, Transport, partition_for

__all__ = [
    "AsyncClient",
    "BrokerError",
    "Client",
    "ClientState",
    "DevStackError",
    "I2VError",
    "InvalidJob",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobHandle",
    "JobStatus",
    "KafkaSettings",
    "KafkaTransport",
    "MissingExtra",
    "ObjectStoreSettings",
    "QueueDepth",
    "Record",
    "TopicSettings",
    "TopicsError",
    "Transport",
    "WaitTimeout",
    "partition_for",
]
