"""A worker node through a broker crash, on the durable local stack (the broker keeps its
log in the S3 server, so a SIGKILL loses nothing that was acked).

What a user relies on: the node says it is not ready while the broker is gone and ready
again when it is back, its log says so in a few lines rather than hundreds per second, a
job that was running finishes with one valid final event, and SIGTERM during an outage
still stops the node cleanly within its grace.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from i2v_fleet.schemas import TopicNames, topic_specs
from tests.conftest import Cluster, run_worker
from tests.consumer.test_worker import _events, _job, _publish

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow, pytest.mark.chaos]

GRACE_S = 2.0


def _ready(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


async def _until_ready(url: str, ready: bool, timeout_s: float) -> float:
    """Seconds until /readyz says `ready` (fails the test past `timeout_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        status, body = await asyncio.to_thread(_ready, url)
        if (status == 200) == ready and (ready or body.get("checks", {}).get("kafka") is False):
            return time.monotonic() - start
        await asyncio.sleep(0.25)
    pytest.fail(f"/readyz did not turn {'ready' if ready else 'not ready'} in {timeout_s} s")


async def _until_running(cluster: Cluster, topics: TopicNames, job_id: uuid.UUID) -> None:
    """Return once the job's `started` event is on i2v.status."""
    consumer = AIOKafkaConsumer(
        topics.status, **cluster.kafka.client_kwargs(), auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            if any(r.key == str(job_id).encode() for rs in batch.values() for r in rs):
                return
        pytest.fail("the job did not start")
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def outage_topics(durable_cluster: Cluster) -> TopicNames:
    from i2v_fleet.producer_sdk.admin import create_topics

    names = TopicNames().with_suffix(f".o{uuid.uuid4().hex[:8]}")
    asyncio.run(create_topics(durable_cluster.kafka, topic_specs(names, partitions=2)))
    return names


@pytest.fixture
def outage_worker(
    durable_cluster: Cluster,
    outage_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {
        "BROKER_CHECK_S": "1",
        "SHUTDOWN_GRACE": str(GRACE_S),
        "NODE_ID": "outage-node",
        # The node's behaviour in an outage, not the model's: a stand-in engine, 0.5 s a step.
        "STANDIN_ENGINE": "pace:0.5",
        "I2V_TEST_TOOLS": "true",
    }
    yield from run_worker(durable_cluster, outage_topics, tiny_model_dir, tmp_path_factory, env)


@pytest.mark.timeout(420)
async def test_a_broker_crash_makes_the_node_unready_then_ready_and_loses_nothing(
    outage_worker: Any, durable_cluster: Cluster, outage_topics: TopicNames
) -> None:
    stack = durable_cluster.stack
    assert stack is not None
    url = outage_worker.ops_url
    await _until_ready(url, True, 60)

    # A job is running when the broker dies.
    job = _job(infer_steps=4)
    await _publish(
        durable_cluster.kafka, outage_topics.requests, job.model_dump_json().encode(), job.key
    )
    await _until_running(durable_cluster, outage_topics, job.job_id)

    log_before = outage_worker.log.read_bytes().count(b"\n")
    await asyncio.to_thread(stack.kill_broker)
    unready_s = await _until_ready(url, False, 30)
    await asyncio.sleep(8)  # the outage goes on: the log must stay quiet
    outage_lines = outage_worker.log.read_bytes().count(b"\n") - log_before
    restart_s = await asyncio.to_thread(stack.start_broker, 60)
    ready_s = await _until_ready(url, True, 60)
    print(
        f"\nbroker killed: not ready after {unready_s:.1f} s; {outage_lines} log lines in "
        f"{unready_s + 8:.0f} s of outage; broker answered {restart_s:.1f} s after restart, "
        f"node ready {ready_s:.1f} s later"
    )
    assert outage_lines < 40, outage_worker.log.read_text()[-4000:]
    log = outage_worker.log.read_text()
    assert "kafka broker unreachable" in log
    assert "kafka broker reachable again after an outage of" in log

    # The running job ends with one valid final event, and the node claims new work.
    events = await _events(durable_cluster.kafka, outage_topics.status, job.job_id, timeout=150)
    assert events[-1].type == "succeeded", [e.type for e in events]
    after = _job()
    await _publish(
        durable_cluster.kafka, outage_topics.requests, after.model_dump_json().encode(), after.key
    )
    events = await _events(durable_cluster.kafka, outage_topics.status, after.job_id, timeout=120)
    assert events[-1].type == "succeeded"

    # SIGTERM while the broker is gone: the node still stops, cleanly, within its grace.
    await asyncio.to_thread(stack.kill_broker)
    try:
        await _until_ready(url, False, 30)
        sent = time.monotonic()
        outage_worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(outage_worker.wait, GRACE_S + 30)
        took = time.monotonic() - sent
        print(f"SIGTERM during the outage: exit {code} after {took:.1f} s")
        assert code == 0, outage_worker.log.read_text()[-4000:]
        assert took < GRACE_S + 15
        assert "Traceback" not in outage_worker.log.read_text()[-20000:]
    finally:
        await asyncio.to_thread(stack.start_broker, 60)
