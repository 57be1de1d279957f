"""The i2v-fleet client library: connection settings, topic administration, the `i2v` CLI.

Upstream services use it to publish jobs and follow them. It depends on `schemas` only
among our packages and never on torch.
"""

from __future__ import annotations

from .errors import BrokerError, DevStackError, I2VError, MissingExtra, TopicsError
from .settings import KafkaSettings, ObjectStoreSettings, TopicSettings

__all__ = [
    "BrokerError",
    "DevStackError",
    "I2VError",
    "KafkaSettings",
    "MissingExtra",
    "ObjectStoreSettings",
    "TopicSettings",
    "TopicsError",
]
