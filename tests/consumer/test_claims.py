"""Claims and the supervisor's claim sequence, with a fake consumer (unit layer, no broker)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from i2v_fleet.consumer.claims import Claims, claim_oldest
from i2v_fleet.consumer.outcome import SUCCEEDED, Outcome
from i2v_fleet.consumer.redelivery import Redelivery
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.consumer.supervisor import Supervisor
from i2v_fleet.schemas import JobRequest


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
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    subscribed: bool = True
    batches: list[dict[TopicPartition, list[Any]]] = field(default_factory=list)

    def subscription(self) -> set[str]:
        return {"r"} if self.subscribed else set()

    def unsubscribe(self) -> None:
        self.subscribed = False
        self.parts = set()
        self.paused_set = set()

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends.get(tp, 0) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions.get(tp, 0)

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
        return self.batches.pop(0) if self.batches else {}

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
    chosen = claim_oldest(consumer, batch)  # type: ignore[arg-type]
    assert (chosen.partition, chosen.offset) == (1, 5)
    assert sorted(consumer.seeks, key=lambda s: s[0].partition) == [(t0, 10), (t1, 6)]


_JOB = JobRequest(
    job_id="3f2b8c1e-1d2a-4c55-9d7e-0b1f2a3c4d5e",
    prompt="a cat",
    image={"url": "https://a.io/x.png"},
)


def _supervisor(idle: tuple[str, ...] = ("idle-node",), **env: Any) -> Supervisor:
    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        **{"shutdown_grace": 0.0, **env},
    )
    supervisor = Supervisor(settings, engine=None, store=None, policy=None)  # type: ignore[arg-type]
    supervisor.retry_pause_s = 0.0
    supervisor.peers = SimpleNamespace(idle_peers=lambda max_age_s, idle_for_s: idle)  # type: ignore[assignment]
    supervisor.redelivery = Redelivery(None, supervisor.claim_tries, 0.0)  # type: ignore[arg-type]
    return supervisor


def _claims(supervisor: Supervisor, consumer: _FakeConsumer) -> Claims:
    claims = Claims(consumer, "r", on_left=supervisor.metrics.group_leaves.inc)  # type: ignore[arg-type]
    claims.lag_check_s = 0.01
    return claims


async def _serve(
    supervisor: Supervisor, consumer: _FakeConsumer, record: _Record, *others: _Record
) -> None:
    """Fetch `record` (with `others` fetched behind it) and serve it, as the node's loop does."""
    tp = TopicPartition(record.topic, record.partition)
    consumer.batches.append({tp: [record, *others]})
    claims = _claims(supervisor, consumer)
    fetched = await claims.fetch()
    assert fetched is not None
    await supervisor._serve(claims, *fetched)


def _admit(supervisor: Supervisor, admit: Any) -> None:
    supervisor.admission = SimpleNamespace(admit=admit)  # type: ignore[assignment]


def _run(supervisor: Supervisor, run: Any) -> None:
    async def wrapped(job: Any, ref: Any) -> Outcome:
        await run(job, ref)
        return SUCCEEDED

    supervisor.runner = SimpleNamespace(run=wrapped)  # type: ignore[assignment]


async def test_a_claim_that_fails_is_not_committed(monkeypatch: Any) -> None:
    """If the claim's first event could not be written, the offset stays and the record
    comes back."""
    tp = TopicPartition("r", 0)
    consumer = _FakeConsumer({tp})
    supervisor = _supervisor()

    async def broken(record: Any) -> None:
        raise ConnectionError("broker went away")

    _admit(supervisor, broken)
    await _serve(supervisor, consumer, _Record("r", 0, 42, 0))
    assert consumer.commits == []
    assert consumer.seeks[-1] == (tp, 42)
    assert not consumer.paused_set


async def test_a_claim_is_committed_before_the_job_runs(monkeypatch: Any) -> None:
    """Once `started` is acked the offset moves past the record (a lease covers the rest);
    the node stays a member with every partition paused while nothing waits behind it."""
    tp, other = TopicPartition("r", 0), TopicPartition("r", 1)
    consumer = _FakeConsumer({tp, other})
    supervisor = _supervisor()
    seen: list[Any] = []

    async def admit(record: Any) -> Any:
        return _JOB

    async def execute(job: Any, ref: Any) -> None:
        seen.append((list(consumer.commits), set(consumer.paused_set), consumer.subscribed))
        await asyncio.sleep(0.1)

    _admit(supervisor, admit)
    _run(supervisor, execute)
    await _serve(supervisor, consumer, _Record("r", 0, 42, 0))
    assert seen == [([{tp: 43}], {tp, other}, True)]
    assert consumer.subscribed
    assert not consumer.paused_set


async def test_a_busy_node_leaves_the_group_when_records_wait(monkeypatch: Any) -> None:
    """Records behind the running job (in the batch, or arriving later in a paused
    partition) make the node leave, so an idle member gets the partitions."""
    tp = TopicPartition("r", 0)
    supervisor = _supervisor()
    left_while_running: list[bool] = []

    async def admit(record: Any) -> Any:
        return _JOB

    _admit(supervisor, admit)

    # Waiting at claim time: leaves at once.
    consumer = _FakeConsumer({tp})

    async def execute(job: Any, ref: Any) -> None:
        await asyncio.sleep(0.1)
        left_while_running.append(not consumer.subscribed)

    _run(supervisor, execute)
    await _serve(supervisor, consumer, _Record("r", 0, 42, 0), _Record("r", 0, 43, 0))
    assert left_while_running == [True]

    # A record lands behind the job later: the lag check sees it and leaves.
    consumer = _FakeConsumer({tp}, positions={tp: 43})
    arrived = asyncio.Event()

    async def execute_then_lag(job: Any, ref: Any) -> None:
        await asyncio.sleep(0.05)
        assert consumer.subscribed
        consumer.ends[tp] = 44
        arrived.set()
        await asyncio.sleep(0.2)
        left_while_running.append(not consumer.subscribed)

    _run(supervisor, execute_then_lag)
    await _serve(supervisor, consumer, _Record("r", 0, 42, 0))
    assert left_while_running == [True, True]
    assert supervisor.metrics.group_leaves._value.get() == 2


@pytest.mark.parametrize(
    ("policy", "idle"), [("never", ("idle-node",)), ("auto", ())], ids=["never", "no-idle-peer"]
)
async def test_staying_keeps_the_partitions_paused(
    monkeypatch: Any, policy: str, idle: tuple[str, ...]
) -> None:
    """With `never`, or when no other node is idle (leaving would only cost two
    rebalances), a busy node keeps its partitions paused."""
    tp = TopicPartition("r", 0)
    supervisor = _supervisor(idle, leave_group_while_busy=policy)
    consumer = _FakeConsumer({tp}, ends={tp: 50}, positions={tp: 43})

    async def admit(record: Any) -> Any:
        return _JOB

    async def execute(job: Any, ref: Any) -> None:
        await asyncio.sleep(0.1)
        assert consumer.subscribed
        assert consumer.paused_set == {tp}

    _admit(supervisor, admit)
    _run(supervisor, execute)
    await _serve(supervisor, consumer, _Record("r", 0, 42, 0), _Record("r", 0, 43, 0))
    assert consumer.subscribed
