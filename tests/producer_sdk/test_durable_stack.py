"""The durable local stack: a broker that keeps its log on the S3 server survives a crash.

Owns the checks that topics, records and committed offsets outlive a SIGKILL of the broker
and its restart on the same bucket, and that `i2v dev` says where the log lives and keeps
it across `down --keep-s3`. Each test restarts the broker only of a stack it owns.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from i2v_fleet.producer_sdk.admin import create_topics, list_topics
from i2v_fleet.producer_sdk.cli import app
from i2v_fleet.producer_sdk.devstack import DevStack, free_port
from i2v_fleet.producer_sdk.settings import KafkaSettings
from i2v_fleet.schemas import TopicNames, topic_specs
from tests.conftest import Cluster

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow]

RECORDS = 40
FIRST = 15
"""Records the first consumer takes and commits before the crash."""

# Tansu delays a group's first assignment by half the session timeout: keep it short.
GROUP_TIMEOUTS: dict[str, Any] = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}


def _stack(cluster: Cluster) -> DevStack:
    assert cluster.stack is not None
    return cluster.stack


async def _topic(kafka: KafkaSettings) -> TopicNames:
    names = TopicNames().with_suffix(f".d{uuid.uuid4().hex[:8]}")
    await create_topics(kafka, topic_specs(names, partitions=2))
    return names


async def _produce(kafka: KafkaSettings, topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, partition=i % 2)
    finally:
        await producer.stop()


async def _consume(consumer: Any, count: int, timeout_s: float = 20.0) -> list[Any]:
    """Exactly `count` records (or what came within `timeout_s`), in arrival order."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500, max_records=count - len(records))
        records.extend(r for batch in batches.values() for r in batch)
    return records


def _consumer(kafka: KafkaSettings, topic: str, group: str) -> Any:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        topic,
        **kafka.client_kwargs(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **GROUP_TIMEOUTS,
    )


async def test_records_topics_and_offsets_survive_a_broker_crash(
    durable_cluster: Cluster,
) -> None:
    """After SIGKILL and a restart on the same bucket, the topics are there and a new member
    of the group reads exactly the records that the first one had not committed."""
    from aiokafka import TopicPartition

    stack, kafka = _stack(durable_cluster), durable_cluster.kafka
    names = await _topic(kafka)
    group = f"durable-{uuid.uuid4().hex[:6]}"
    values = [f"record-{i}".encode() for i in range(RECORDS)]
    await _produce(kafka, names.requests, values)

    first = _consumer(kafka, names.requests, group)
    await first.start()
    try:
        taken = await _consume(first, FIRST)
        assert len(taken) == FIRST
        ends: dict[Any, int] = {}
        for r in taken:
            ends[TopicPartition(r.topic, r.partition)] = r.offset + 1
        await first.commit(ends)
    finally:
        await first.stop()

    assert await asyncio.to_thread(stack.kill_broker)
    restart_s = await asyncio.to_thread(stack.start_broker)
    print(f"\nbroker answered metadata {restart_s:.2f} s after start_broker")
    assert set(names.model_dump().values()) <= set(await list_topics(kafka))

    second = _consumer(kafka, names.requests, group)
    joined = time.monotonic()
    await second.start()
    try:
        for tp, offset in ends.items():
            assert await second.committed(tp) == offset
        rest = await _consume(second, RECORDS - FIRST)
        print(f"the group's new member got its first records {time.monotonic() - joined:.2f} s")
        assert not await second.getmany(timeout_ms=500)
    finally:
        await second.stop()
    seen = [(r.partition, r.offset) for r in taken + rest]
    assert len(seen) == len(set(seen)) == RECORDS
    assert sorted(r.value for r in taken + rest) == sorted(values)


async def test_a_live_member_commits_again_right_after_a_restart(
    durable_cluster: Cluster,
) -> None:
    """A member that stays up while the broker crashes right after a commit finds that
    commit after the restart (never an older offset), can commit again at once and reads
    on."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaError

    stack, kafka = _stack(durable_cluster), durable_cluster.kafka
    names = await _topic(kafka)
    await _produce(kafka, names.requests, [f"r{i}".encode() for i in range(10)])
    member = _consumer(kafka, names.requests, f"live-{uuid.uuid4().hex[:6]}")
    await member.start()
    try:
        assert len(await _consume(member, 6)) == 6
        await member.commit()
        committed = {tp: await member.committed(tp) for tp in member.assignment()}
        assert await asyncio.to_thread(stack.kill_broker)  # no moment for anything to flush
        await asyncio.to_thread(stack.start_broker)
        restarted = time.monotonic()
        for tp, offset in committed.items():
            assert await member.committed(tp) == offset
        while True:  # the first commit after the restart
            try:
                await member.commit({TopicPartition(names.requests, 0): 1})
                break
            except KafkaError:
                assert time.monotonic() - restarted < 15, "the group never took a commit"
                await asyncio.sleep(0.1)
        print(f"\nfirst commit after the restart took {time.monotonic() - restarted:.2f} s")
        # Kafka lets a member move its offset back on purpose; the broker keeps the last one.
        assert await member.committed(TopicPartition(names.requests, 0)) == 1
        # The member reads on from where it was, records produced after the restart too.
        # Waiting for those also takes its fetcher out of the backoff after the failed
        # fetches: aiokafka 0.14's stop() raises CancelledError (and leaves connections
        # open) when it cancels a fetch in that backoff.
        await _produce(kafka, names.requests, [b"after-0", b"after-1"])
        rest = await _consume(member, 6)
        assert {r.value for r in rest} >= {b"after-0", b"after-1"}
        assert len(rest) == 6
    finally:
        await member.stop()


def test_status_reports_the_brokers_s3_storage(durable_cluster: Cluster) -> None:
    """`DevStack.status()` and `i2v dev status` name the bucket that holds the log."""
    stack = _stack(durable_cluster)
    c = stack.config
    storage = {s.name: s.storage for s in stack.status()}
    assert storage == {"broker": f"s3://{c.broker_bucket}/", "s3": "memory"}
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
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert f"s3://{c.broker_bucket}/" in result.stdout


def test_down_keep_s3_keeps_the_log_for_the_next_up_and_down_empties_it(tmp_path: Path) -> None:
    """`up --durable`, `down --keep-s3`, `up --durable`: the topics are still there. A plain
    `down` stops the S3 server too, and the next `up` starts from nothing."""
    args = ["--state-dir", str(tmp_path), "--kafka-port", str(free_port())]
    args += ["--s3-port", str(free_port()), "--partitions", "1"]
    runner = CliRunner()
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{args[3]}")
    names = TopicNames().with_suffix(f".k{uuid.uuid4().hex[:8]}")
    try:
        up = runner.invoke(app, ["dev", "up", "--durable", *args])
        assert up.exit_code == 0, up.output
        assert "broker log in s3://i2v-broker-log/" in up.stderr
        asyncio.run(create_topics(kafka, topic_specs(names, partitions=1)))

        kept = runner.invoke(app, ["dev", "down", "--keep-s3", *args[:6]])
        assert kept.exit_code == 0, kept.output
        assert "kept running" in kept.stderr
        again = runner.invoke(app, ["dev", "up", "--durable", *args])
        assert again.exit_code == 0, again.output
        assert "broker  started" in again.stderr
        assert "s3      running" in again.stderr
        assert names.requests in asyncio.run(list_topics(kafka))
    finally:
        down = runner.invoke(app, ["dev", "down", *args[:6]])
    assert down.exit_code == 0
    try:
        fresh = runner.invoke(app, ["dev", "up", "--durable", *args])
        assert fresh.exit_code == 0, fresh.output
        assert names.requests not in asyncio.run(list_topics(kafka))
    finally:
        runner.invoke(app, ["dev", "down", *args[:6]])
