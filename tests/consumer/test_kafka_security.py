"""The worker's Kafka security settings, at the configuration level: the local broker
(Tansu 0.6) offers neither TLS nor a SASL mechanism aiokafka can use, so these settings are
checked where they turn into aiokafka's arguments."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

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
