"""Errors the SDK and the `i2v` command raise, mapped from the libraries below them.

    I2VError
    ├── MissingExtra       a command needs an optional extra that is not installed
    ├── BrokerError        Kafka could not be reached or refused a request
    │   └── TopicsError    topics could not be created or checked
    └── DevStackError      the local development stack could not start or stop

Owns the exception tree; never lets aiokafka or minio exceptions escape the public API.
"""

from __future__ import annotations


class I2VError(Exception):
    """Base of every error raised by i2v-fleet's client side."""


class MissingExtra(I2VError):
    """A feature needs an optional extra: the message names the pip command."""

    def __init__(self, extra: str, missing: list[str], feature: str) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"{feature} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'i2v-fleet[{extra}]'"
        )


class BrokerError(I2VError):
    """Kafka could not be reached or refused a request."""


class TopicsError(BrokerError):
    """Topics could not be created or checked."""


class DevStackError(I2VError):
    """The local stack could not be started, checked or stopped."""
