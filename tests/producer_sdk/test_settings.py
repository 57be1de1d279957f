"""Settings come from the documented environment variables and map onto aiokafka."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import i2v_fleet
from i2v_fleet import connection
from i2v_fleet.producer_sdk import KafkaSettings, MissingExtra, ObjectStoreSettings, TopicSettings
from i2v_fleet.producer_sdk import settings as sdk_settings
from i2v_fleet.producer_sdk._extras import require_extra


def test_kafka_settings_read_the_documented_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """KAFKA_* variables configure SASL over TLS for every client."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b1:9093,b2:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret")
    kwargs = KafkaSettings().client_kwargs()
    assert kwargs["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc"
    assert kwargs["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(KafkaSettings())


def test_topic_names_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    """I2V_TOPIC_<ROLE> renames one topic and leaves the others at their defaults."""
    monkeypatch.setenv("I2V_TOPIC_STATUS", "acme.status")
    names = TopicSettings().names()
    assert names.status == "acme.status"
    assert names.requests == "i2v.requests"


def test_object_store_settings_hide_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """MINIO_* variables configure the store; the secret never shows in a repr."""
    monkeypatch.setenv("MINIO_ENDPOINT", "minio:9000")
    monkeypatch.setenv("MINIO_SECRET_KEY", "topsecret")
    monkeypatch.setenv("MINIO_SECURE", "true")
    s3 = ObjectStoreSettings()
    assert (s3.endpoint, s3.secure) == ("minio:9000", True)
    assert "topsecret" not in repr(s3)


def test_the_settings_have_one_home_that_imports_no_client_library() -> None:
    """The SDK's public settings are i2v_fleet.connection's classes (the node reads the
    same), and importing that module loads no Kafka or S3 client and no torch."""
    for name in ("KafkaSettings", "TopicSettings", "ObjectStoreSettings"):
        home = getattr(connection, name)
        assert getattr(i2v_fleet, name) is home
        assert getattr(i2v_fleet.producer_sdk, name) is home
        assert getattr(sdk_settings, name) is home
    code = (
        "import sys, i2v_fleet.connection; "
        "print(sorted({'aiokafka', 'minio', 'torch', 'i2v_fleet.producer_sdk'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_free_port_gives_a_port_that_binds() -> None:
    """`free_port` names a loopback port that nobody holds, so a server can take it."""
    port = connection.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_missing_extra_names_the_pip_command() -> None:
    """A feature whose extra is not installed says, in one line, what to install."""
    with pytest.raises(MissingExtra) as info:
        require_extra("worker", ["json", "no_such_module_xyz"], "i2v worker")
    message = str(info.value)
    assert "pip install 'i2v-fleet[worker]'" in message
    assert "no_such_module_xyz" in message
    assert "\n" not in message
