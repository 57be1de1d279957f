"""The local stack is real: records and objects make the round trip through it."""

from __future__ import annotations

import asyncio
import io
import socket
import urllib.request
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from minio import Minio
from typer.testing import CliRunner

from i2v_fleet.producer_sdk.admin import TopicOutcome, create_topics, list_topics
from i2v_fleet.producer_sdk.cli import app
from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig, free_port
from i2v_fleet.producer_sdk.errors import DevStackError
from i2v_fleet.producer_sdk.settings import KafkaSettings, ObjectStoreSettings
from i2v_fleet.schemas import JOB_REQUEST_ADAPTER, JobRequest, TopicNames, topic_specs
from tests.conftest import Cluster


@pytest.mark.kafka
async def test_job_request_round_trips_through_a_consumer_group(
    kafka: KafkaSettings, topics: TopicNames
) -> None:
    """A JobRequest produced with aiokafka is consumed by a group member and decodes equal."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    request = JobRequest(
        job_id=uuid.uuid4(),
        prompt="a lighthouse in a storm, waves crashing",
        image={"url": "https://images.example.com/lighthouse.jpg"},
        metadata={"tenant": "acme"},
    )
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topics.requests,
            request.model_dump_json().encode(),
            key=request.key,
            headers=[("i2v-schema-version", b"1")],
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topics.requests,
        **kafka.client_kwargs(),
        group_id=f"i2v-workers-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(record.topic, record.partition))
    finally:
        await consumer.stop()

    assert (record.partition, record.offset) == (sent.partition, sent.offset)
    assert record.key == str(request.job_id).encode()
    assert JOB_REQUEST_ADAPTER.validate_json(record.value) == request
    assert committed == record.offset + 1


@pytest.mark.minio
def test_object_reads_back_byte_equal_through_a_presigned_url(s3: ObjectStoreSettings) -> None:
    """An object put with the minio SDK comes back byte for byte from a presigned GET URL."""
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=s3.secure)
    payload = bytes(range(256)) * 1000
    key = f"jobs/{uuid.uuid4()}/video.mp4"
    client.put_object(s3.bucket, key, io.BytesIO(payload), len(payload), content_type="video/mp4")
    url = client.presigned_get_object(s3.bucket, key, expires=timedelta(hours=1))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "video/mp4"
        assert response.read() == payload


@pytest.mark.kafka
async def test_create_topics_is_idempotent(kafka: KafkaSettings) -> None:
    """Creating the topics twice creates them once and then reports them as existing."""
    names = TopicNames().with_suffix(f".c{uuid.uuid4().hex[:8]}")
    specs = topic_specs(names, partitions=2)
    first = await create_topics(kafka, specs)
    second = await create_topics(kafka, specs)
    assert set(first.values()) == {TopicOutcome.CREATED}
    assert set(second.values()) == {TopicOutcome.EXISTS}
    assert set(names.model_dump().values()) <= set(await list_topics(kafka))


@pytest.mark.kafka
def test_topics_create_command_uses_the_environment(kafka: KafkaSettings) -> None:
    """`i2v topics create` creates the configured names on the cluster it is pointed at."""
    suffix = f".cli{uuid.uuid4().hex[:8]}"
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
    env.update({f"I2V_TOPIC_{r.upper()}": n for r, n in TopicNames().with_suffix(suffix)})
    runner = CliRunner()
    result = runner.invoke(app, ["topics", "create", "--partitions", "2"], env=env)
    assert result.exit_code == 0, result.output
    assert f"i2v.requests{suffix}" in result.stdout
    assert "created" in result.stdout
    again = runner.invoke(app, ["topics", "create", "--partitions", "2"], env=env)
    assert again.exit_code == 0
    assert "exists" in again.stdout


def test_topics_create_explains_an_unreachable_broker() -> None:
    """Pointing at a port where nothing listens gives one line naming the variable to fix."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = CliRunner().invoke(app, ["topics", "create"], env=env)
    assert result.exit_code == 1
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr


@pytest.mark.kafka
@pytest.mark.minio
@pytest.mark.slow
def test_dev_up_twice_is_harmless_and_down_stops_it(tmp_path: Path) -> None:
    """`i2v dev up` starts both services, a second `up` changes nothing, `down` stops them."""
    args = [
        "--state-dir",
        str(tmp_path),
        "--kafka-port",
        str(free_port()),
        "--s3-port",
        str(free_port()),
    ]
    runner = CliRunner()
    try:
        first = runner.invoke(app, ["dev", "up", *args])
        assert first.exit_code == 0, first.output
        assert "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in first.stdout
        assert "export MINIO_ENDPOINT=" in first.stdout
        pids = (tmp_path / "broker.pid").read_text(), (tmp_path / "s3.pid").read_text()

        second = runner.invoke(app, ["dev", "up", *args])
        assert second.exit_code == 0, second.output
        assert second.stdout == first.stdout
        assert "running" in second.stderr
        assert "started" not in second.stderr
        assert pids == ((tmp_path / "broker.pid").read_text(), (tmp_path / "s3.pid").read_text())
        assert runner.invoke(app, ["dev", "status", *args]).exit_code == 0
    finally:
        down = runner.invoke(app, ["dev", "down", *args])
    assert down.exit_code == 0
    assert "stopped" in down.stderr
    assert runner.invoke(app, ["dev", "status", *args]).exit_code == 1


def test_dev_up_refuses_a_port_taken_by_another_program(tmp_path: Path) -> None:
    """When the broker's port is taken, `up` says so and which option to change."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = DevStack(StackConfig(state_dir=tmp_path, kafka_port=port, s3_port=free_port()))
        result = CliRunner().invoke(
            app,
            [
                "dev",
                "up",
                "--state-dir",
                str(tmp_path),
                "--kafka-port",
                str(port),
                "--s3-port",
                str(stack.config.s3_port),
            ],
        )
    assert result.exit_code == 1
    assert "--kafka-port" in result.stderr
    assert stack.broker.pid() is None
    assert stack.s3.pid() is None


@pytest.mark.kafka
def test_the_session_stack_is_reported_healthy(cluster: Cluster) -> None:
    """`i2v dev status` on the tests' own stack shows both services answering."""
    if cluster.stack is None:
        pytest.skip("running against an external cluster")
    c = cluster.stack.config
    result = CliRunner().invoke(
        app,
        [
            "dev",
            "status",
            "--state-dir",
            str(c.state_dir),
            "--kafka-port",
            str(c.kafka_port),
            "--s3-port",
            str(c.s3_port),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("yes") == 2
    assert {s.name: s.storage for s in cluster.stack.status()} == {
        "broker": "memory",
        "s3": "memory",
    }


@pytest.mark.kafka
def test_up_durable_refuses_a_running_memory_broker(cluster: Cluster) -> None:
    """Asking for a durable broker where a memory one runs says how to switch, and changes
    nothing: the running broker keeps its pid and its storage."""
    if cluster.stack is None:
        pytest.skip("running against an external cluster")
    c = cluster.stack.config
    pid = cluster.stack.broker.pid()
    durable = DevStack(replace(c, durable=True))
    with pytest.raises(DevStackError, match=r"runs with memory storage.*--keep-s3"):
        durable.up()
    assert cluster.stack.broker.pid() == pid
    assert durable.running_config().storage == "memory"
