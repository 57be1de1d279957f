"""The worker's Kafka security settings, at the configuration level: the local broker
(Tansu 0.6) offers neither TLS nor a SASL mechanism aiokafka can use, so these settings are
checked where they turn into aiokafka's arguments."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from i2v_fleet.connection import KafkaSettings
from i2v_fleet.consumer.settings import WorkerSettings
from tests.consumer.test_store_tls import write_test_ca


def test_sasl_over_tls_reaches_every_client_with_the_private_ca(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """KAFKA_SECURITY_PROTOCOL=SASL_SSL with KAFKA_SSL_CAFILE: a verifying TLS context that
    trusts that CA, and the SASL mechanism and credentials; the password never shows."""
    ca = write_test_ca(tmp_path)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b1:9093,b2:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "node")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(ca))
    settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    kwargs = settings.kafka_kwargs()
    assert kwargs["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert kwargs["security_protocol"] == "SASL_SSL"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == ("SCRAM-SHA-256", "node")
    assert kwargs["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(settings)


def test_plaintext_sets_no_tls_or_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_SECURITY_PROTOCOL", raising=False)
    kwargs = WorkerSettings(_env_file=None).kafka_kwargs()  # type: ignore[call-arg]
    assert kwargs["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in kwargs
    assert "sasl_mechanism" not in kwargs


def test_a_missing_ca_file_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(FileNotFoundError):
        WorkerSettings(_env_file=None).kafka_kwargs()  # type: ignore[call-arg]


def test_the_node_and_the_sdk_read_kafka_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One set of KAFKA_* variables gives the node the SDK's connection arguments, a client
    certificate included; only the client id names the node."""
    write_test_ca(tmp_path)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("KAFKA_SSL_CERTFILE", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("KAFKA_SSL_KEYFILE", str(tmp_path / "key.pem"))
    monkeypatch.setenv("NODE_ID", "n1")
    node = WorkerSettings(_env_file=None).kafka_kwargs()  # type: ignore[call-arg]
    sdk = KafkaSettings().client_kwargs()
    assert node.pop("client_id") == "i2v-worker-n1"
    assert sdk.pop("client_id") == "i2v-fleet"
    node_tls, sdk_tls = node.pop("ssl_context"), sdk.pop("ssl_context")
    assert node == sdk
    for context in (node_tls, sdk_tls):
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


def test_keyword_names_spelled_as_the_environment_reach_the_shared_settings() -> None:
    """`kafka_bootstrap_servers=`, `i2v_topic_<role>=` and `minio_<name>=` set the node's
    Kafka, topics and store, instead of being silently ignored."""
    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        kafka_bootstrap_servers="b1:9092,b2:9092",
        kafka_session_timeout_ms=20000,
        i2v_topic_status="acme.status",
        minio_bucket="acme-videos",
        lanes=2,
    )
    assert settings.kafka_kwargs()["bootstrap_servers"] == ["b1:9092", "b2:9092"]
    assert settings.kafka_session_timeout_ms == 20000  # the node's own, not the connection's
    assert (settings.topics.status, settings.topics.requests) == ("acme.status", "i2v.requests")
    assert settings.object_store.bucket == "acme-videos"
    lane = settings.lane(1)
    assert (lane.topics, lane.object_store) == (settings.topics, settings.object_store)
    assert lane.kafka_kwargs()["client_id"] == f"i2v-worker-{settings.node_id}-lane1"


def test_variables_named_like_the_shared_fields_are_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KAFKA, TOPICS or OBJECT_STORE in a node's environment (another tool's) change nothing:
    the shared settings read only their prefixed variables."""
    for name in ("KAFKA", "TOPICS", "OBJECT_STORE"):
        monkeypatch.setenv(name, "not json")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b1:9092")
    settings = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.kafka.bootstrap_servers == "b1:9092"
