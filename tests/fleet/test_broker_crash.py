"""Broker crashes under a working fleet, on the durable local stack (the broker keeps its
log in the S3 server, so what it acked survives a SIGKILL).

The broker is SIGKILLed and restarted while jobs queue and one runs, right as a node
claims its next job, and while a new node's reaper rebuilds its view of i2v.status. Every
acked job must reach exactly one valid first final event, no committed offset of the
workers group may go backwards, and every node must turn not ready during each outage and
ready after it. Prints the recovery times and duplicate runs docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from minio import Minio

from i2v_fleet.producer_sdk.admin import create_topics
from i2v_fleet.schemas import TopicNames, topic_specs
from tests.conftest import Cluster

from .harness import Fleet, StatusLog, cheap_job, publish

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.minio,
    pytest.mark.slow,
    pytest.mark.chaos,
    pytest.mark.timeout(600),
]

PARTITIONS = 4
JOBS = 8


def _ready(node: Any) -> bool | None:
    """True/False as /readyz says, None when the node does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ops_port}/readyz", timeout=3):
            return True
    except urllib.error.HTTPError:
        return False
    except OSError:
        return None


async def _all(fleet: Fleet, ready: bool, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        states = await asyncio.gather(*(asyncio.to_thread(_ready, n) for n in fleet.nodes.values()))
        if all(s is ready for s in states):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"nodes did not all turn {'ready' if ready else 'not ready'}")


async def _committed(cluster: Cluster, group: str, topic: str) -> dict[int, int]:
    """The workers group's committed offsets (read without joining the group)."""
    consumer = AIOKafkaConsumer(
        **cluster.kafka.client_kwargs(), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        found: dict[int, int] = {}
        for p in range(PARTITIONS):
            offset = await consumer.committed(TopicPartition(topic, p))
            found[p] = offset if offset is not None else -1
        return found
    finally:
        await consumer.stop()


async def _crash(
    fleet: Fleet, cluster: Cluster, topics: TopicNames, what: str, figures: dict[str, Any]
) -> None:
    """SIGKILL the broker, see every node turn not ready, start it, see them ready again;
    committed offsets must not go backwards across it."""
    stack = cluster.stack
    assert stack is not None
    before = await _committed(cluster, fleet.group, topics.requests)
    await asyncio.to_thread(stack.kill_broker)
    unready = await _all(fleet, False, 30)
    await asyncio.sleep(1)
    restart = await asyncio.to_thread(stack.start_broker, 60)
    ready = await _all(fleet, True, 60)
    after = await _committed(cluster, fleet.group, topics.requests)
    assert all(after[p] >= before[p] for p in before), (what, before, after)
    figures[what] = (unready, restart, ready)


async def test_broker_crashes_lose_no_acked_job(
    durable_cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    topics = TopicNames().with_suffix(f".c{uuid.uuid4().hex[:8]}")
    await create_topics(durable_cluster.kafka, topic_specs(topics, partitions=PARTITIONS))
    fleet = Fleet(
        kafka=durable_cluster.kafka.bootstrap_servers,
        s3_endpoint=durable_cluster.s3.endpoint,
        s3=durable_cluster.s3,
        topics=topics,
        model_dir=tiny_model_dir,
        tmp=tmp_path,
        BROKER_CHECK_S="1",
        LEASE_S="20",
        HEARTBEAT_S="2",
        LEASE_GRACE_S="2",
        MAX_ATTEMPTS="10",
    )
    figures: dict[str, Any] = {}
    try:
        for name in ("a", "b"):
            fleet.start(name)
        await asyncio.to_thread(fleet.wait_ready)
        await fleet.settled(PARTITIONS, timeout=90)
        jobs = [cheap_job(seed=i) for i in range(JOBS)]
        async with StatusLog(durable_cluster.kafka, topics.status) as status:
            await publish(
                durable_cluster.kafka,
                topics.requests,
                [(j.key, j.model_dump_json().encode()) for j in jobs],
            )
            # (a) + (b): jobs queue and one runs.
            await status.wait(
                lambda: any(status.first(j.job_id, "started") for j in jobs), 60, "a start"
            )
            await _crash(fleet, durable_cluster, topics, "queued + mid-job", figures)
            # (c) right as a node finishes a job and claims its next one.
            done = sum(status.final(j.job_id) is not None for j in jobs)
            await status.wait(
                lambda: sum(status.final(j.job_id) is not None for j in jobs) > done,
                120,
                "a job to end",
            )
            await _crash(fleet, durable_cluster, topics, "claiming", figures)
            # (d) while a new node's reaper rebuilds (the reapers group rebalances, so
            # every reaper rebuilds its partitions).
            node = fleet.start("c")
            deadline = time.monotonic() + 120
            while b"reaper: rebuilding" not in node.log.read_bytes():
                assert time.monotonic() < deadline, fleet.tail("c")
                await asyncio.sleep(0.05)
            await _crash(fleet, durable_cluster, topics, "reaper rebuilding", figures)

            await status.wait(
                lambda: all(status.final(j.job_id) is not None for j in jobs),
                300,
                "every job's final event",
            )
            s3 = durable_cluster.s3
            client = Minio(
                s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=False
            )
            duplicates = 0
            for job in jobs:
                final = status.final(job.job_id)
                assert final.type == "succeeded", (job.job_id, final)
                video = await asyncio.to_thread(
                    lambda k=final.result.key: client.get_object(s3.bucket, k).read()
                )
                assert hashlib.sha256(video).hexdigest() == final.result.sha256
                duplicates += sum(e.type == "started" for e in status.of(job.job_id)) - 1
    finally:
        fleet.close()
        for node in fleet.history:
            print(f"--- {node.log.name} ---")
            print(node.log.read_text(errors="replace")[-2000:])
    print(f"\n{JOBS} jobs, 3 broker crashes: 0 lost, {duplicates} extra runs")
    for what, (unready, restart, ready) in figures.items():
        print(
            f"  {what}: all nodes not ready {unready:.1f} s after the kill; broker answered "
            f"{restart:.1f} s after its start; all nodes ready {ready:.1f} s later"
        )
    print(f"  recovery p50 {statistics.median(f[2] for f in figures.values()):.1f} s")
