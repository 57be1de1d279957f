"""Claim bookkeeping in the supervisor, with a fake consumer (unit layer, no broker)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from consumer.supervisor import Supervisor, _claim_oldest


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    timestamp: int


@dataclass
class _FakeConsumer:
    """Just the calls the supervisor makes, recorded."""

    parts: set[TopicPartition]
    paused_set: set[TopicPartition] = field(default_factory=set)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return self.parts

    def paused(self) -> set[TopicPartition]:
        return self.paused_set

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_set |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def getmany(self, timeout_ms: int = 0) -> dict[Any, Any]:
        await asyncio.sleep(0.01)  # like the real one, it yields to the running job
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)


def test_the_oldest_head_is_claimed_and_the_rest_rewound() -> None:
    """The oldest first record wins; every partition is rewound to what it did not hand out."""
    t0, t1 = TopicPartition("r", 0), TopicPartition("r", 1)
    batch = {
        t0: [_Record("r", 0, 10, 2000), _Record("r", 0, 11, 2500)],
        t1: [_Record("r", 1, 5, 1000), _Record("r", 1, 6, 3000)],
    }
    consumer = _FakeConsumer({t0, t1})
    chosen = _claim_oldest(consumer, batch)
    assert (chosen.partition, chosen.offset) == (1, 5)
    assert sorted(consumer.seeks, key=lambda s: s[0].partition) == [(t0, 10), (t1, 6)]


async def test_a_job_that_cannot_finish_is_not_committed(monkeypatch: Any) -> None:
    """If no final event could be written, the offset stays and the record comes back."""
    tp = TopicPartition("r", 0)
    consumer = _FakeConsumer({tp})
    supervisor = Supervisor.__new__(Supervisor)

    async def broken(record: Any) -> None:
        raise ConnectionError("broker went away")

    monkeypatch.setattr(supervisor, "_handle", broken, raising=False)
    monkeypatch.setattr(supervisor, "retry_pause_s", 0.0, raising=False)
    await supervisor._serve(consumer, _Record("r", 0, 42, 0))
    assert consumer.commits == []
    assert consumer.seeks[-1] == (tp, 42)
    assert not consumer.paused_set


async def test_a_finished_job_is_committed_and_partitions_resumed(monkeypatch: Any) -> None:
    """After the final event the offset moves past the record and claiming resumes."""
    tp = TopicPartition("r", 0)
    consumer = _FakeConsumer({tp})
    supervisor = Supervisor.__new__(Supervisor)

    async def done(record: Any) -> None:
        assert consumer.paused_set == {tp}  # nothing else is claimed while it runs

    monkeypatch.setattr(supervisor, "_handle", done, raising=False)
    await supervisor._serve(consumer, _Record("r", 0, 42, 0))
    assert consumer.commits == [{tp: 43}]
    assert not consumer.paused_set
