"""Test your code without Kafka: an in-memory transport and a fake worker.

    from i2v_fleet.producer_sdk import AsyncClient
    from i2v_fleet.producer_sdk.testing import FakeWorker, MemoryTransport

    async def test_my_service() -> None:
        transport = MemoryTransport()
        async with AsyncClient(transport=transport) as client, FakeWorker(transport):
            job = await client.submit(b"...jpeg bytes...", prompt="a cat")
            result = await client.wait(job.job_id)   # the fake worker succeeded it

Owns the fakes only: they speak the real message schemas and write events by the node's
own rules (`schemas.records`: keys, headers, `seq`, percent, topics), so code tested
against them works against the fleet. Must never be imported by the library itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from i2v_fleet.schemas import (
    JOB_REQUEST_ADAPTER,
    WORKERS_GROUP,
    ErrorInfo,
    FailedEvent,
    JobEvent,
    JobRequest,
    JobResult,
    OutgoingRecord,
    Phase,
    SeqCounter,
    StartedEvent,
    SucceededEvent,
    TopicNames,
    ends_attempt,
    progress_event,
    progress_record,
    status_record,
    utcnow,
)

from .transport import Record, partition_for


class MemoryTransport:
    """A broker in memory: topics of `partitions` partitions, murmur2-partitioned by key."""

    def __init__(self, partitions: int = 4) -> None:
        self.partition_count = partitions
        self.log: dict[tuple[str, int], list[Record]] = defaultdict(list)
        self.committed: dict[tuple[str, str, int], int] = {}
        """(group, topic, partition) -> next offset the group will process."""
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        partition = partition_for(key, self.partition_count)
        records = self.log[(topic, partition)]
        records.append(Record(topic, partition, len(records), int(time.time() * 1000), key, value))
        async with self._changed:
            self._changed.notify_all()
        return partition, len(records) - 1

    async def partitions(self, topic: str) -> int:
        return self.partition_count

    async def follow(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> AsyncIterator[Record]:
        positions = {
            tp: next(
                (r.offset for r in self.log[tp] if since_ms is None or r.timestamp_ms >= since_ms),
                len(self.log[tp]),
            )
            for tp in partitions
        }
        while True:
            fresh = [r for tp in partitions for r in self.log[tp][positions[tp] :]]
            for tp in partitions:
                positions[tp] = len(self.log[tp])
            for record in sorted(fresh, key=lambda r: r.timestamp_ms):
                yield record
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)

    async def read(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> list[Record]:
        found = [
            r
            for tp in partitions
            for r in self.log[tp]
            if since_ms is None or r.timestamp_ms >= since_ms
        ]
        return sorted(found, key=lambda r: r.timestamp_ms)

    async def backlog(self, topic: str, group: str) -> dict[int, int]:
        return {
            p: len(self.log[(topic, p)]) - self.committed.get((group, topic, p), 0)
            for p in range(self.partition_count)
        }


@dataclass
class Outcome:
    """What the fake worker does with the next jobs: succeed (default) or fail."""

    fail_with: ErrorInfo | None = None
    progress_steps: int = 3


@dataclass
class FakeWorker:
    """Claims every job published through `transport` and answers it with real events.

    Set `next_outcome` (or pass `outcome`) to make it fail jobs or report more steps.
    """

    transport: MemoryTransport
    topics: TopicNames = field(default_factory=TopicNames)
    outcome: Outcome = field(default_factory=Outcome)
    node_id: str = "fake-node"
    handled: list[JobRequest] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _seq: SeqCounter = field(default_factory=SeqCounter, init=False, repr=False)

    async def __aenter__(self) -> FakeWorker:
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _serve(self) -> None:
        requests = [(self.topics.requests, p) for p in range(self.transport.partition_count)]
        async for record in self.transport.follow(requests, None):
            if record.value is not None:
                await self._answer(JOB_REQUEST_ADAPTER.validate_json(record.value))
            key = (WORKERS_GROUP, record.topic, record.partition)
            self.transport.committed[key] = record.offset + 1

    async def _answer(self, job: JobRequest) -> None:
        self.handled.append(job)
        await self._status(
            StartedEvent(
                **self._common(job),
                lease_expires_at=utcnow() + timedelta(seconds=60),
                request=job,
            )
        )
        # Unthrottled, unlike a node: every step goes out, so tests can count them.
        steps = self.outcome.progress_steps
        for step in range(steps + 1):
            event = progress_event(job, Phase.DENOISING, step, steps)
            await self._publish(progress_record(self.topics, event))
        if self.outcome.fail_with is not None:
            await self._status(FailedEvent(**self._common(job), error=self.outcome.fail_with))
            return
        size = job.image_size
        await self._status(
            SucceededEvent(
                **self._common(job),
                result=JobResult(
                    bucket="fake",
                    key=f"jobs/{job.job_id}/video.mp4",
                    url=f"https://fake.invalid/jobs/{job.job_id}/video.mp4",
                    url_expires_at=utcnow() + timedelta(days=7),
                    poster_key=f"jobs/{job.job_id}/poster.jpg",
                    size_bytes=1,
                    sha256="0" * 64,
                    width=size.width,
                    height=size.height,
                    num_frames=job.num_frames,
                    fps=job.fps,
                ),
            )
        )

    def _common(self, job: JobRequest) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "seq": self._seq.next(job.job_id, job.attempt),
            "node_id": self.node_id,
            "attempt": job.attempt,
            "metadata": job.metadata,
        }

    async def _status(self, event: JobEvent) -> None:
        await self._publish(status_record(self.topics, event))
        if ends_attempt(event):
            self._seq.end(event.job_id, event.attempt)

    async def _publish(self, record: OutgoingRecord) -> None:
        await asyncio.sleep(0.002)  # distinct millisecond timestamps keep the order readable
        await self.transport.publish(record.topic, record.key, record.value, record.headers)
