"""A worker node end to end on the local stack with the tiny model: claim, run, store, report."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
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
    CancelRequest,
    JobRequest,
    SucceededEvent,
    TopicNames,
)

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow]

FINAL_TYPES = {"succeeded", "failed", "cancelled"}
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
                final = next((i for i, e in enumerate(found) if e.type in FINAL_TYPES), None)
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
    path = Path(f"/tmp/{job.job_id}.mp4")
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


async def test_poison_and_invalid_records_do_not_stop_the_next_job(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """Garbage goes to the DLQ, an invalid job fails naming its field, the next job succeeds."""
    bad = _job()
    invalid = bad.model_dump(mode="json") | {"num_frames": 80}
    from pydantic import TypeAdapter

    await _publish(cluster.kafka, worker_topics.requests, b"\x00not json at all", b"junk")
    await _publish(
        cluster.kafka,
        worker_topics.requests,
        TypeAdapter(dict[str, Any]).dump_json(invalid),
        bad.key,
    )
    good = _job()
    await _publish(cluster.kafka, worker_topics.requests, good.model_dump_json().encode(), good.key)

    failed = await _events(cluster.kafka, worker_topics.status, bad.job_id)
    assert [e.type for e in failed] == ["failed"]
    assert failed[0].error.code == "invalid_request"
    assert "num_frames" in failed[0].error.message
    done = await _events(cluster.kafka, worker_topics.status, good.job_id)
    assert done[-1].type == "succeeded"

    dead = AIOKafkaConsumer(
        worker_topics.dlq, **cluster.kafka.client_kwargs(), auto_offset_reset="earliest"
    )
    await dead.start()
    try:
        record = await asyncio.wait_for(dead.getone(), 10)
    finally:
        await dead.stop()
    assert record.value == b"\x00not json at all"
    headers = dict(record.headers)
    assert headers["i2v-error-code"] == b"invalid_request"
    assert headers["i2v-original-topic"] == worker_topics.requests.encode()


async def test_no_hostile_record_stops_its_partition(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """Every kind of record that once wedged a partition sits in front of a valid job in
    the same partition: each is answered (failed with a stable code when its id is
    readable) or dead-lettered, and the valid job behind them all succeeds."""
    ids = [uuid.uuid4() for _ in range(7)]
    base = _job().model_dump(mode="json")

    def job(i: int, **fields: Any) -> bytes:
        return json.dumps({**base, "job_id": str(ids[i]), **fields}).encode()

    # (record, its job id when readable, whether a DLQ copy is expected)
    hostile: list[tuple[bytes, uuid.UUID | None, bool]] = [
        # The refusal would echo a control character: in the id, in a field name.
        (b'{"job_id": "3f2b8c1e\\u0001", "prompt": "x"}', None, True),
        (f'{{"job_id": "{ids[0]}", "a\\u0000b": 1}}'.encode(), ids[0], False),
        # A field name and a metadata key thousands of characters long.
        (job(1, **{"n" * 5000: 1}), ids[1], False),
        (job(2, metadata={"k" * 5000: "v"}), ids[2], True),
        # The record's own attempt cannot go into an event.
        (job(3, attempt=0), ids[3], True),
        (job(4, attempt=2**70), ids[4], True),
        # Wrong-typed metadata; no id and a control character in the message.
        (job(5, metadata=["a"]), ids[5], True),
        (b'{"prompt": "\\u0007", "\\u0001": 2}', None, True),
        # An s3 reference whose key climbs out of its folder.
        (job(6, image={"s3": {"bucket": "i2v-in", "key": "a/../b.png"}}), ids[6], False),
    ]
    for value, job_id, _ in hostile:
        key = str(job_id).encode() if job_id else b"hostile"
        await _publish(cluster.kafka, worker_topics.requests, value, key, partition=0)
    good = _job()
    await _publish(
        cluster.kafka, worker_topics.requests, good.model_dump_json().encode(), good.key, 0
    )
    done = await _events(cluster.kafka, worker_topics.status, good.job_id, timeout=120)
    assert done[-1].type == "succeeded"
    for job_id in ids:
        events = await _events(cluster.kafka, worker_topics.status, job_id, timeout=10)
        assert [e.type for e in events] == ["failed"], job_id
        assert events[0].error.code == "invalid_request"
        assert events[0].attempt == 1
    dead = await _dlq_values(cluster.kafka, worker_topics.dlq)
    assert {value for value, _, copied in hostile if copied} <= set(dead)
    assert not {value for value, _, copied in hostile if not copied} & set(dead)


async def _dlq_values(kafka: KafkaSettings, topic: str) -> list[bytes]:
    """Every value on the DLQ topic so far."""
    consumer = AIOKafkaConsumer(
        topic, **kafka.client_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=3000)
        return [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()


async def test_cancel_while_queued_and_ttl_expiry_cost_no_compute(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A job cancelled before it is claimed ends cancelled; one past its ttl ends expired."""
    cancelled = _job()
    cancel = CancelRequest(job_id=cancelled.job_id, reason="changed my mind")
    await _publish(
        cluster.kafka, worker_topics.control, cancel.model_dump_json().encode(), cancelled.key
    )
    await asyncio.sleep(1.0)
    await _publish(
        cluster.kafka, worker_topics.requests, cancelled.model_dump_json().encode(), cancelled.key
    )
    stale = _job(ttl_s=1, submitted_at="2020-01-01T00:00:00Z")
    await _publish(
        cluster.kafka, worker_topics.requests, stale.model_dump_json().encode(), stale.key
    )

    events = await _events(cluster.kafka, worker_topics.status, cancelled.job_id)
    assert [e.type for e in events] == ["cancelled"]
    assert events[0].reason == "changed my mind"
    expired = await _events(cluster.kafka, worker_topics.status, stale.job_id)
    assert [e.type for e in expired] == ["failed"]
    assert expired[0].error.code == "expired"


async def test_cancel_and_timeout_stop_a_running_job(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A running job stops at its next step on cancel (cancelled) or past timeout_s (timeout)."""
    long_job = _job(infer_steps=100)
    await _publish(
        cluster.kafka, worker_topics.requests, long_job.model_dump_json().encode(), long_job.key
    )
    progress = AIOKafkaConsumer(
        worker_topics.progress, **cluster.kafka.client_kwargs(), auto_offset_reset="earliest"
    )
    await progress.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            record = await asyncio.wait_for(progress.getone(), 90)
            event = PROGRESS_ADAPTER.validate_json(record.value)
            if event.job_id == long_job.job_id and event.phase == "denoising" and event.step >= 1:
                break
    finally:
        await progress.stop()
    cancel = CancelRequest(job_id=long_job.job_id, reason="stop it")
    await _publish(
        cluster.kafka, worker_topics.control, cancel.model_dump_json().encode(), long_job.key
    )
    events = await _events(cluster.kafka, worker_topics.status, long_job.job_id)
    assert events[-1].type == "cancelled"
    assert "succeeded" not in [e.type for e in events]

    slow = _job(infer_steps=100, timeout_s=4)
    await _publish(cluster.kafka, worker_topics.requests, slow.model_dump_json().encode(), slow.key)
    events = await _events(cluster.kafka, worker_topics.status, slow.job_id)
    assert events[-1].type == "failed"
    assert events[-1].error.code == "timeout"
    assert "timeout_s=4" in events[-1].error.message


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


@pytest.mark.chaos
async def test_a_stalled_engine_is_replaced_and_the_job_retried(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """An engine that makes no step for ENGINE_STALL_TIMEOUT (here: frozen) is killed and
    restarted; the attempt is handed back as retryable and the next one succeeds."""
    job = _job(infer_steps=30)
    await _publish(cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key)
    await _wait_for_step(cluster.kafka, worker_topics.progress, job.job_id, 2)
    os.kill(_engine_pid(worker), signal.SIGSTOP)

    events = await _events(cluster.kafka, worker_topics.status, job.job_id, timeout=120)
    lifecycle = [(e.type, e.attempt) for e in events if e.type != "heartbeat"]
    assert lifecycle == [("started", 1), ("requeued", 1), ("started", 2), ("succeeded", 2)]
    requeued = next(e for e in events if e.type == "requeued")
    assert (requeued.reason, requeued.error.code, requeued.error.retryable) == (
        "engine_failure",
        "internal",
        True,
    )
    assert "made no progress for 20 s" in requeued.error.message
    assert worker.poll() is None


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
    status, body = await asyncio.to_thread(_get, f"{worker.ops_url}/info")
    info = as_json(body)
    assert (status, info["node_id"], info["engine_alive"]) == (200, "test-node-1", True)
    # The only member of its groups: it claims from, and reaps, every partition.
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


async def test_bad_images_fail_with_their_codes_and_the_node_goes_on(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A GIF fails image_invalid, a loopback URL fails image_fetch_failed; no compute runs."""
    gif = base64.b64encode(b"GIF89a" + b"\0" * 64).decode()
    not_an_image = _job(image={"base64": gif})
    private_url = _job(image={"url": "http://127.0.0.1:9/secret.png?X-Amz-Signature=abc"})
    for job in (not_an_image, private_url):
        await _publish(
            cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key
        )
    invalid = await _events(cluster.kafka, worker_topics.status, not_an_image.job_id)
    assert invalid[-1].type == "failed"
    assert invalid[-1].error.code == "image_invalid"
    assert "GIF" in invalid[-1].error.message
    fetch = await _events(cluster.kafka, worker_topics.status, private_url.job_id)
    assert fetch[-1].type == "failed"
    assert fetch[-1].error.code == "image_fetch_failed"
    assert "ALLOWED_HOSTS" in fetch[-1].error.message
    assert "Signature" not in fetch[-1].error.message


async def test_an_s3_image_reference_is_read_from_the_nodes_store(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """A job whose image is an `s3` reference in the node's bucket runs to a video."""
    s3: ObjectStoreSettings = cluster.s3
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=False)
    key = f"uploads/{uuid.uuid4()}.jpg"
    await asyncio.to_thread(client.fput_object, s3.bucket, key, str(PHOTO))
    job = _job(image={"s3": {"bucket": s3.bucket, "key": key}})
    await _publish(cluster.kafka, worker_topics.requests, job.model_dump_json().encode(), job.key)
    events = await _events(cluster.kafka, worker_topics.status, job.job_id)
    assert events[-1].type == "succeeded"
    missing = _job(image={"s3": {"bucket": s3.bucket, "key": "uploads/nope.jpg"}})
    await _publish(
        cluster.kafka, worker_topics.requests, missing.model_dump_json().encode(), missing.key
    )
    events = await _events(cluster.kafka, worker_topics.status, missing.job_id)
    assert events[-1].type == "failed"
    assert events[-1].error.code == "image_fetch_failed"
