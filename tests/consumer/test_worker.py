"""A worker node end to end on the local stack with the tiny model: claim, run, store, report.

What only a real process shows stays here: a real generation stored and reported, a job
outlasting the broker's poll interval, an engine process killed with SIGKILL, the ops
server on a real broker. Every other node scenario (hostile records, cancel, ttl, timeout,
stalled engine, bad images, s3 references, shutdown, hand-back) runs in-process in
test_node.py, on the same supervisor.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from minio import Minio

from i2v_fleet.pipeline import probe_mp4
from i2v_fleet.producer_sdk.settings import KafkaSettings, ObjectStoreSettings
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    NODE_INFO_ADAPTER,
    PROGRESS_ADAPTER,
    EventType,
    JobRequest,
    SucceededEvent,
    TopicNames,
)

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow]

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"


def _job(**fields: Any) -> JobRequest:
    """A cheap job: the smallest size, 5 frames, 2 steps."""
    base: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "prompt": "she smiles",
        "image": {"base64": base64.b64encode(PHOTO.read_bytes()).decode()},
        "image_size": "480*832",
        "num_frames": 5,
        "quality_preset": "custom",
        "infer_steps": 2,
        "guidance_scale": 2.0,
        "seed": 1,
        "metadata": {"suite": "worker"},
    }
    return JobRequest.model_validate({**base, **fields})


async def _publish(
    kafka: KafkaSettings, topic: str, value: bytes, key: bytes | None, partition: int | None = None
) -> None:
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def _events(
    kafka: KafkaSettings,
    topic: str,
    job_id: uuid.UUID,
    timeout: float = 90.0,
    until_final: bool = True,
    adapter: Any = JOB_EVENT_ADAPTER,
) -> list[Any]:
    """Every event of `job_id` on `topic`, until the final one (or the timeout)."""
    consumer = AIOKafkaConsumer(
        topic, **kafka.client_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if record.key == str(job_id).encode():
                        found.append(adapter.validate_json(record.value))
            # Up to the first final event, as clients read a job (a heartbeat racing the
            # final event may land after it).
            if until_final:
                final = next(
                    (i for i, e in enumerate(found) if EventType(e.type).is_terminal()), None
                )
                if final is not None:
                    return found[: final + 1]
        return found
    finally:
        await consumer.stop()


async def test_a_job_becomes_a_stored_video_with_events(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A submitted job gets started, progress and succeeded; the MP4 and meta.json are stored."""
    job = _job()
    await _publish(cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key)
    events = await _events(cluster.kafka, worker_topics.status, job.job_id)
    types = [e.type for e in events]
    assert types[0] == "started", types
    assert types[-1] == "succeeded", types
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(e.metadata == {"suite": "worker"} and e.node_id == "test-node-1" for e in events)
    final = events[-1]
    assert isinstance(final, SucceededEvent)
    result = final.result
    video = await asyncio.to_thread(lambda: urllib.request.urlopen(result.url, timeout=10).read())
    assert len(video) == result.size_bytes
    path = worker.log.parent / f"{job.job_id}.mp4"
    path.write_bytes(video)
    try:
        info = probe_mp4(path)
    finally:
        path.unlink()
    assert (info.width, info.height, info.num_frames) == (480, 832, 5)
    assert (result.width, result.height, result.num_frames, result.fps) == (480, 832, 5, 16)
    assert {"loading_inputs", "denoising", "decoding", "uploading", "total"} <= set(result.timings)

    s3: ObjectStoreSettings = cluster.s3
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=False)
    meta_raw = client.get_object(s3.bucket, f"jobs/{job.job_id}/meta.json").read()
    from pydantic import TypeAdapter

    meta = TypeAdapter(dict[str, Any]).validate_json(meta_raw)
    assert meta["job_id"] == str(job.job_id)
    assert meta["parameters"]["seed"] == 1
    assert meta["parameters"]["infer_steps"] == 2
    assert meta["request"]["prompt"] == "she smiles"
    assert meta["request"]["image"] == {"base64_bytes": PHOTO.stat().st_size}
    assert meta["result"]["sha256"] == result.sha256
    assert "torch" in meta["versions"]

    progress = await _events(
        cluster.kafka,
        worker_topics.progress,
        job.job_id,
        timeout=5,
        until_final=False,
        adapter=PROGRESS_ADAPTER,
    )
    phases = [p.phase for p in progress]
    assert phases[0] == "loading_inputs"
    assert phases[-1] == "uploading"
    assert progress[-1].percent == 100.0
    assert [p.step for p in progress if p.phase == "denoising"][-1] == 2


def _engine_pid(worker: subprocess.Popen[bytes]) -> int:
    """The worker's engine process (its spawned child that is not a resource tracker)."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return int(pid)
    raise AssertionError(f"no engine process among {children}")


async def _wait_for_step(kafka: KafkaSettings, topic: str, job_id: uuid.UUID, step: int) -> None:
    consumer = AIOKafkaConsumer(topic, **kafka.client_kwargs(), auto_offset_reset="earliest")
    await consumer.start()
    try:
        while True:
            record = await asyncio.wait_for(consumer.getone(), 90)
            event = PROGRESS_ADAPTER.validate_json(record.value)
            if event.job_id == job_id and event.phase == "denoising" and event.step >= step:
                return
    finally:
        await consumer.stop()


async def test_a_job_longer_than_max_poll_interval_runs_once(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A job running well past max_poll_interval_ms is not redelivered: one start, one success."""
    job = _job(infer_steps=40)
    started = time.monotonic()
    await _publish(cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key)
    events = await _events(cluster.kafka, worker_topics.status, job.job_id, timeout=120)
    assert time.monotonic() - started > 3.0 * 2  # the job outlasted the poll interval twice
    assert [e.type for e in events if e.type != "heartbeat"] == ["started", "succeeded"]
    await asyncio.sleep(4)  # a redelivery would show up as a second start by now
    again = await _events(cluster.kafka, worker_topics.status, job.job_id, timeout=3)
    assert [e.type for e in again].count("started") == 1


@pytest.mark.chaos
async def test_a_killed_engine_is_restarted_and_the_job_retried(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """Killing the engine mid-job requeues the job as attempt 2, which then succeeds."""
    job = _job(infer_steps=30)
    await _publish(cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key)
    await _wait_for_step(cluster.kafka, worker_topics.progress, job.job_id, 2)
    os.kill(_engine_pid(worker), 9)

    events = await _events(
        cluster.kafka, worker_topics.status, job.job_id, timeout=5, until_final=False
    )
    deadline = time.monotonic() + 150
    while not any(e.type == "succeeded" for e in events) and time.monotonic() < deadline:
        events = await _events(
            cluster.kafka, worker_topics.status, job.job_id, timeout=5, until_final=False
        )
    lifecycle = [(e.type, e.attempt) for e in events if e.type != "heartbeat"]
    assert lifecycle == [("started", 1), ("requeued", 1), ("started", 2), ("succeeded", 2)]
    requeued = next(e for e in events if e.type == "requeued")
    assert requeued.reason == "engine_failure"
    assert worker.poll() is None  # the node itself kept running


def _get(url: str) -> tuple[int, bytes]:
    path = url
    try:
        with urllib.request.urlopen(path, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_ops_endpoints_and_node_heartbeats(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """/healthz, /readyz, /metrics and /info answer, and the node announces itself."""
    from pydantic import TypeAdapter

    as_json = TypeAdapter(dict[str, Any]).validate_json
    status, body = await asyncio.to_thread(_get, f"{worker.ops_url}/healthz")
    assert status == 200
    status, body = await asyncio.to_thread(_get, f"{worker.ops_url}/readyz")
    assert status == 200, body
    assert as_json(body)["checks"] == {
        "model_loaded": True,
        "kafka": True,
        "cancel_reader": True,
        "reaper": True,
        "object_store": True,
    }
    status, body = await asyncio.to_thread(_get, f"{worker.ops_url}/metrics")
    assert status == 200
    for name in (
        "i2v_jobs_total",
        "i2v_jobs_in_flight",
        "i2v_phase_seconds",
        "i2v_engine_restarts_total",
        "i2v_uploaded_bytes_total",
        "i2v_reaped_total",
        "i2v_group_leaves_total",
        "i2v_requeues_total",
    ):
        assert name.encode() in body, name
    # Ready comes before the group's first assignment (the local broker assigns about half a
    # session timeout after the join): then the only member claims from every partition.
    deadline = time.monotonic() + 30
    while True:
        status, body = await asyncio.to_thread(_get, f"{worker.ops_url}/info")
        info = as_json(body)
        if info["requests_partitions"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert (status, info["node_id"], info["engine_alive"]) == (200, "test-node-1", True)
    assert info["requests_partitions"] == [0, 1]
    assert info["reaper"]["status_partitions"] == [0, 1]
    assert "secret" not in body.decode().lower()

    consumer = AIOKafkaConsumer(
        worker_topics.nodes, **cluster.kafka.client_kwargs(), auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 20)
    finally:
        await consumer.stop()
    node = NODE_INFO_ADAPTER.validate_json(record.value)
    assert record.key == b"test-node-1"
    assert node.ops_url == worker.ops_url
