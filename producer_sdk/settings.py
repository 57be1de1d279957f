"""Connection settings read from the environment at the process edge (pydantic-settings).

Owns the names of the KAFKA_*, I2V_TOPIC_* and MINIO_* variables. Must never be read deep
inside the library: build once, pass the frozen objects down.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from i2v_fleet.schemas import TopicNames


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
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    client_id: str = "i2v-fleet"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in {"SSL", "SASL_SSL"}:
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=self.ssl_password.get_secret_value() if self.ssl_password else None,
            )
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
            "empty: the CAs of certifi, or of SSL_CERT_FILE when set."
        ),
    )
    region: str | None = None
