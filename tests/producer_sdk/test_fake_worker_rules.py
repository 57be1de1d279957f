"""The SDK's FakeWorker writes a job's records exactly as a node's Emitter does: same
topics, keys, headers, `seq` order and percent (only ids, times and the ETA differ).

Both run in process: the fake over a `MemoryTransport` that also records headers, the
node's real `Emitter` over a producer that records what it is asked to send.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from i2v_fleet.consumer.events import Emitter
from i2v_fleet.producer_sdk import AsyncClient, JobFailed
from i2v_fleet.producer_sdk.testing import FakeWorker, MemoryTransport, Outcome
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    PROGRESS_ADAPTER,
    ErrorInfo,
    FailedEvent,
    JobRequest,
    Phase,
    SucceededEvent,
    TopicNames,
    percent_done,
)

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
TOPICS = TopicNames()
STEPS = 3
# Differ between any two emitters by nature: ids, clocks, and the ETA (measured time).
_VOLATILE = {"event_id", "time", "lease_expires_at", "eta_s"}

Sent = tuple[str, bytes, bytes, tuple[tuple[str, bytes], ...]]
"""(topic, key, value, headers) of one record."""


class _RecordingTransport(MemoryTransport):
    """A `MemoryTransport` that also keeps every record's headers, in publish order."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Sent] = []

    async def publish(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        self.sent.append((topic, key, value, tuple(headers)))
        return await super().publish(topic, key, value, headers)


@dataclass
class _Producer:
    """Records the Emitter's `send_and_wait`/`send` calls (an aiokafka producer's shape)."""

    sent: list[Sent] = field(default_factory=list)

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> None:
        assert key is not None
        self.sent.append((topic, key, value, tuple(headers or ())))

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> None:
        await self.send_and_wait(topic, value, key, headers)


async def _fake_records(outcome: Outcome) -> tuple[JobRequest, list[Sent]]:
    """One job through the client and the FakeWorker; its status and progress records."""
    transport = _RecordingTransport()
    async with (
        AsyncClient(transport=transport) as client,
        FakeWorker(transport, outcome=outcome) as worker,
    ):
        handle = await client.submit(PHOTO, prompt="she smiles", metadata={"app": "rules"})
        with contextlib.suppress(JobFailed):  # the failing outcome's end
            await client.wait(handle.job_id, timeout=10)
    job = worker.handled[0]
    return job, [r for r in transport.sent if r[0] in (TOPICS.status, TOPICS.progress)]


async def _node_records(job: JobRequest, fake: list[Sent], node_id: str) -> list[Sent]:
    """The same job through a node's Emitter, making the calls a node makes for it."""
    producer = _Producer()
    emitter = Emitter(producer, TOPICS, node_id, interval_s=0.0)
    await emitter.started(job, lease_s=60)
    for step in range(STEPS + 1):
        await emitter.progress(job, Phase.DENOISING, step, STEPS)
    final = JOB_EVENT_ADAPTER.validate_json(fake[-1][2])
    if isinstance(final, SucceededEvent):
        await emitter.succeeded(job, final.result)
    else:
        assert isinstance(final, FailedEvent)
        await emitter.failed(job, final.error)
    return producer.sent


def _stable(record: Sent) -> tuple[str, bytes, tuple[tuple[str, bytes], ...], dict[str, Any]]:
    """A record with its value decoded and the fields that differ by nature left out."""
    topic, key, value, headers = record
    event = (
        JOB_EVENT_ADAPTER.validate_json(value)
        if topic == TOPICS.status
        else PROGRESS_ADAPTER.validate_json(value)
    )
    return topic, key, headers, event.model_dump(mode="json", exclude=_VOLATILE)


@pytest.mark.parametrize(
    ("outcome", "final"),
    [
        (Outcome(progress_steps=STEPS), "succeeded"),
        (
            Outcome(
                progress_steps=STEPS,
                fail_with=ErrorInfo(code="out_of_memory", message="too big", retryable=True),
            ),
            "failed",
        ),
    ],
)
async def test_fake_worker_and_node_emitter_write_the_same_records(
    outcome: Outcome, final: str
) -> None:
    """started, every progress step and the final event match record for record."""
    job, fake = await _fake_records(outcome)
    node = await _node_records(job, fake, node_id="fake-node")

    assert [_stable(r) for r in fake] == [_stable(r) for r in node]
    key = str(job.job_id).encode()
    assert [(topic, k) for topic, k, _, _ in fake] == [
        (TOPICS.status, key),
        *[(TOPICS.progress, key)] * (STEPS + 1),
        (TOPICS.status, key),
    ]
    assert [dict(r[3]) for r in fake if r[0] == TOPICS.status] == [
        {"i2v-schema-version": b"1", "i2v-event-type": b"started"},
        {"i2v-schema-version": b"1", "i2v-event-type": final.encode()},
    ]
    assert {r[3] for r in fake if r[0] == TOPICS.progress} == {(("i2v-schema-version", b"1"),)}
    for records in (fake, node):
        status = [JOB_EVENT_ADAPTER.validate_json(r[2]) for r in records if r[0] == TOPICS.status]
        assert [(e.type, e.seq) for e in status] == [("started", 0), (final, 1)]
        percents = [
            PROGRESS_ADAPTER.validate_json(r[2]).percent for r in records if r[0] == TOPICS.progress
        ]
        assert percents == [percent_done(Phase.DENOISING, s, STEPS) for s in range(STEPS + 1)]


async def test_a_second_job_starts_its_own_seq() -> None:
    """`seq` counts per job and attempt, for the fake as for a node: each job begins at 0."""
    transport = _RecordingTransport()
    async with AsyncClient(transport=transport) as client, FakeWorker(transport):
        for _ in range(2):
            handle = await client.submit(PHOTO, prompt="she smiles")
            await client.wait(handle.job_id, timeout=10)
    status = [
        JOB_EVENT_ADAPTER.validate_json(r[2]) for r in transport.sent if r[0] == TOPICS.status
    ]
    assert [(e.type, e.seq) for e in status] == [("started", 0), ("succeeded", 1)] * 2
