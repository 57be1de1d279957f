"""The SDK's connection settings, re-exported from `i2v_fleet.connection`, their one home.

Owns nothing but the old import path (`i2v_fleet.producer_sdk.settings`) that apps and tests
use. Must never define a setting: the node reads the same classes.
"""

from __future__ import annotations

from i2v_fleet.connection import KafkaSettings, ObjectStoreSettings, TopicSettings

__all__ = ["KafkaSettings", "ObjectStoreSettings", "TopicSettings"]
