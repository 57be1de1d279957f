"""The reaper: its table rules (pure), and re-publication against the real broker."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from i2v_fleet.consumer.events import Emitter
from i2v_fleet.consumer.kafka import AioKafkaClients
from i2v_fleet.consumer.metrics import Metrics
from i2v_fleet.consumer.reaper import PartitionState, Reaper, apply_event
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.producer_sdk.settings import KafkaSettings
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    JOB_REQUEST_ADAPTER,
    ErrorCode,
    HeartbeatEvent,
    JobRequest,
    RecordRef,
    RequeuedEvent,
    RequeueReason,
    StartedEvent,
    SucceededEvent,
    TopicNames,
    utcnow,
)
from i2v_fleet.schemas import topics as wire


def _request(**fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {
            "job_id": str(uuid.uuid4()),
            "prompt": "waves",
            "image": {"url": "https://example.com/a.jpg"},
            "metadata": {"team": "a"},
            **fields,
        }
    )


def _started(job: JobRequest, attempt: int = 1, lease_s: float = 60, seq: int = 0) -> StartedEvent:
    return StartedEvent(
        job_id=job.job_id,
        seq=seq,
        node_id="n1",
        attempt=attempt,
        lease_expires_at=utcnow() + timedelta(seconds=lease_s),
        request=job.model_copy(update={"attempt": attempt}),
    )


def _heartbeat(job: JobRequest, attempt: int, lease_s: float, seq: int) -> HeartbeatEvent:
    return HeartbeatEvent(
        job_id=job.job_id,
        seq=seq,
        node_id="n1",
        attempt=attempt,
        lease_expires_at=utcnow() + timedelta(seconds=lease_s),
        request_ref=RecordRef(topic="r", partition=0, offset=7),
    )


def _succeeded(job: JobRequest, seq: int, attempt: int = 1) -> SucceededEvent:
    return SucceededEvent.model_validate(
        {
            "job_id": job.job_id,
            "seq": seq,
            "node_id": "n1",
            "attempt": attempt,
            "result": {
                "bucket": "b",
                "key": "k",
                "url": "http://x/k",
                "url_expires_at": utcnow(),
                "size_bytes": 1,
                "sha256": "0" * 64,
                "width": 16,
                "height": 16,
                "num_frames": 5,
                "fps": 16,
            },
        }
    )


def test_the_table_keeps_the_latest_attempt_until_a_final_event() -> None:
    state = PartitionState(caught_up_at=0)
    job = _request()
    apply_event(state, _started(job, lease_s=10), 0.0)
    apply_event(state, _heartbeat(job, 1, 60, seq=3), 0.0)
    assert state.open[job.job_id].seq == 3
    assert state.open[job.job_id].lease_expires_at > utcnow() + timedelta(seconds=50)
    assert state.open[job.job_id].request is not None

    # Handed back: the next attempt is a record in the queue, not a lease to watch.
    requeued = RequeuedEvent(
        job_id=job.job_id,
        seq=4,
        node_id="n1",
        attempt=1,
        reason=RequeueReason.SHUTDOWN,
        next_attempt=2,
    )
    apply_event(state, requeued, 0.0)
    assert job.job_id not in state.open
    apply_event(state, _started(job, attempt=2), 0.0)
    # A late heartbeat of attempt 1 does not move attempt 2's lease.
    before = state.open[job.job_id].lease_expires_at
    apply_event(state, _heartbeat(job, 1, 600, seq=9), 0.0)
    assert state.open[job.job_id].attempt == 2
    assert state.open[job.job_id].lease_expires_at == before

    # Any final event closes the job for good, even one from an older attempt.
    done = _succeeded(job, seq=5)
    apply_event(state, done, 0.0)
    apply_event(state, _heartbeat(job, 2, 60, seq=2), 0.0)
    assert job.job_id not in state.open


def test_a_heartbeat_alone_opens_a_job_with_its_request_reference() -> None:
    """A job whose `started` is older than the look-back window is still watched."""
    state = PartitionState(caught_up_at=0)
    job = _request()
    apply_event(state, _heartbeat(job, 2, 5, seq=11), 0.0)
    open_job = state.open[job.job_id]
    assert (open_job.attempt, open_job.seq, open_job.request) == (2, 11, None)
    assert open_job.ref == RecordRef(topic="r", partition=0, offset=7)


# -- against the broker ------------------------------------------------------------------


async def _send(kafka: KafkaSettings, topic: str, event: Any) -> None:
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        if isinstance(event, bytes):
            value, key = event, b"poison"
        else:  # keyed by job id, as nodes write them: one job's events share a partition
            value, key = JOB_EVENT_ADAPTER.dump_json(event), str(event.job_id).encode()
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _read_all(kafka: KafkaSettings, topic: str, want: int, timeout: float = 30) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, **kafka.client_kwargs(), auto_offset_reset="earliest")
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                found.extend(records)
    finally:
        await consumer.stop()
    return found


@pytest.mark.kafka
async def test_an_expired_lease_is_republished_then_marked_and_exhaustion_dead_letters(
    kafka: KafkaSettings, topics: TopicNames
) -> None:
    """Lost attempt 1: the job comes back as attempt 2 (request first, then `requeued`);
    a lost last attempt becomes failed/worker_lost and a DLQ copy. A live lease and a
    finished job are left alone, and a poison status record changes nothing."""
    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        node_id="reaper-node",
        reapers_group=f"reapers-{uuid.uuid4().hex[:6]}",
        lease_s=2,
        heartbeat_s=1,
        lease_grace_s=0.5,
        reaper_interval_s=0.2,
        max_attempts=3,
        **{f"i2v_topic_{role}": name for role, name in topics},
    )
    lost, last, alive, finished = _request(), _request(), _request(), _request()
    # A large request: its node's events carry only where its record lies, and the reaper
    # saw none of its `started` (older than the look-back), only a heartbeat.
    by_ref = _request(metadata={"team": "b"})
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    meta = await producer.send_and_wait(
        topics.requests, by_ref.model_dump_json().encode(), key=by_ref.key
    )
    await producer.stop()
    heartbeat = HeartbeatEvent(
        job_id=by_ref.job_id,
        seq=7,
        node_id="n2",
        attempt=1,
        lease_expires_at=utcnow() - timedelta(seconds=5),
        request_ref=RecordRef(topic=topics.requests, partition=meta.partition, offset=meta.offset),
    )
    await _send(kafka, topics.status, heartbeat)
    # Written before the reaper starts: it must find them by rebuilding from the look-back.
    await _send(kafka, topics.status, _started(lost, lease_s=-5, seq=4))
    await _send(kafka, topics.status, b"\x00 not an event")
    await _send(kafka, topics.status, _started(finished, lease_s=-5))
    await _send(kafka, topics.status, _succeeded(finished, seq=1))

    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    clients = AioKafkaClients(settings.kafka_kwargs())
    reaper = Reaper(settings, clients, Emitter(producer, topics, "reaper-node"), Metrics())
    await reaper.start()
    try:
        # Written while it follows: a last attempt expiring, and a lease kept alive.
        await _send(kafka, topics.status, _started(last, attempt=3, lease_s=1))
        await _send(kafka, topics.status, _started(alive, lease_s=60))
        requests = await _read_all(kafka, topics.requests, want=3)
        dlq = await _read_all(kafka, topics.dlq, want=1)
        status = await _read_all(kafka, topics.status, want=10, timeout=20)
    finally:
        await reaper.stop()
        await producer.stop()

    republished = sorted(
        (r.key, JOB_REQUEST_ADAPTER.validate_json(r.value).model_dump_json())
        for r in requests
        if (r.partition, r.offset) != (meta.partition, meta.offset)
    )
    assert republished == sorted(
        (job.key, job.model_copy(update={"attempt": 2}).model_dump_json()) for job in (lost, by_ref)
    )
    [copy] = dlq
    assert JOB_REQUEST_ADAPTER.validate_json(copy.value).job_id == last.job_id
    assert dict(copy.headers)[wire.HEADER_ERROR_CODE] == b"worker_lost"

    events = [JOB_EVENT_ADAPTER.validate_json(r.value) for r in status if r.value[:1] == b"{"]
    requeued = [e for e in events if e.type == "requeued"]
    assert {(e.job_id, e.attempt, e.next_attempt, e.seq) for e in requeued} == {
        (lost.job_id, 1, 2, 5),
        (by_ref.job_id, 1, 2, 8),
    }
    assert {e.reason for e in requeued} == {RequeueReason.LEASE_EXPIRED}
    assert {e.job_id: e.metadata for e in requeued} == {
        lost.job_id: {"team": "a"},
        by_ref.job_id: {"team": "b"},
    }
    failed = [e for e in events if e.type == "failed"]
    assert [(e.job_id, e.attempt, e.error.code) for e in failed] == [
        (last.job_id, 3, ErrorCode.WORKER_LOST)
    ]
    assert not [
        e
        for e in events
        if e.job_id in (alive.job_id, finished.job_id) and e.node_id == "reaper-node"
    ]
