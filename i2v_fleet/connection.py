"""How the SDK and the node reach the fleet: the KAFKA_*, I2V_TOPIC_* and MINIO_* settings.

Owns those variables' names and defaults, and aiokafka's arguments with a verifying TLS context.
Must never import a client library or torch: built once at a process edge, passed down frozen.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from i2v_fleet.schemas import TopicNames

__all__ = ["KafkaSettings", "ObjectStoreSettings", "TopicSettings", "free_port"]

_TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster (KAFKA_*)."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore", frozen=True)

    bootstrap_servers: str = Field(
        "localhost:9092", description="Comma-separated host:port list (KAFKA_BOOTSTRAP_SERVERS)."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = Field(
        None,
        description=(
            "PEM bundle of the CAs that may sign the brokers' certificates (KAFKA_SSL_CAFILE); "
            "empty: the system's CAs."
        ),
    )
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    client_id: str = "i2v-fleet"

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying TLS context (certificate and host name checked) that trusts
        KAFKA_SSL_CAFILE, else the system's CAs, and presents KAFKA_SSL_CERTFILE when set.
        A CA or certificate file that cannot be read raises here, at start."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile)
        if self.ssl_certfile:
            password = self.ssl_password.get_secret_value() if self.ssl_password else None
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in _TLS_PROTOCOLS:
            kwargs["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return kwargs


class TopicSettings(BaseSettings):
    """Topic names (I2V_TOPIC_REQUESTS, I2V_TOPIC_STATUS, ...)."""

    model_config = SettingsConfigDict(env_prefix="I2V_TOPIC_", extra="ignore", frozen=True)

    requests: str = TopicNames().requests
    status: str = TopicNames().status
    progress: str = TopicNames().progress
    control: str = TopicNames().control
    dlq: str = TopicNames().dlq
    nodes: str = TopicNames().nodes

    def names(self) -> TopicNames:
        return TopicNames(**self.model_dump())


class ObjectStoreSettings(BaseSettings):
    """How to reach MinIO or another S3 store (MINIO_*)."""

    model_config = SettingsConfigDict(env_prefix="MINIO_", extra="ignore", frozen=True)

    endpoint: str = Field("localhost:9000", description="host:port, no scheme (MINIO_ENDPOINT).")
    access_key: str = "minioadmin"
    secret_key: SecretStr = SecretStr("minioadmin")
    bucket: str = "i2v-videos"
    secure: bool = False
    ca_file: str | None = Field(
        None,
        description=(
            "PEM bundle of the CAs that may sign the store's certificate (MINIO_CA_FILE); "
            "empty: the node trusts the system's CAs, the SDK those of certifi (or of "
            "SSL_CERT_FILE when set)."
        ),
    )
    region: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a local server or a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
