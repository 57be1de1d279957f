"""Kafka in memory behind the node's seam (consumer/kafka.py), for in-process node tests.

Topics of N partitions keyed by murmur2 like the real client, consumer groups that assign
partitions round-robin and call rebalance listeners, committed offsets, pause/seek/
positions, and a switch that makes the broker unreachable. A test tool: the node's real
behaviour against a real broker is covered by the subprocess suites.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import OffsetAndTimestamp, TopicPartition

from i2v_fleet.producer_sdk.transport import partition_for


@dataclass(frozen=True)
class MemoryRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class MemoryBroker:
    """The whole cluster: topics, groups, and whether it answers."""

    def __init__(self, partitions: int = 4) -> None:
        self.default_partitions = partitions
        self.log: dict[str, list[list[MemoryRecord]]] = {}
        self.groups: dict[str, _Group] = defaultdict(_Group)
        self.reachable = True

    def topic(self, name: str) -> list[list[MemoryRecord]]:
        if name not in self.log:
            self.log[name] = [[] for _ in range(self.default_partitions)]
        return self.log[name]

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of `topic`, in (partition, offset) order."""
        return [r for part in self.topic(topic) for r in part]

    def check(self) -> None:
        if not self.reachable:
            raise KafkaConnectionError("memory broker: unreachable (as the test asked)")

    async def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Iterable[tuple[str, bytes]] | None,
        partition: int | None = None,
    ) -> MemoryRecord:
        self.check()
        parts = self.topic(topic)
        p = partition if partition is not None else _partition(key, len(parts))
        record = MemoryRecord(
            topic, p, len(parts[p]), int(time.time() * 1000), key, value, tuple(headers or ())
        )
        parts[p].append(record)
        return record

    def clients(self) -> MemoryClients:
        return MemoryClients(self)

    def rebalance(self, group_id: str) -> None:
        """Spread every subscribed topic's partitions over the group's members."""
        group = self.groups[group_id]
        topics = sorted({t for m in group.members for t in m.subscribed})
        tps = [TopicPartition(t, p) for t in topics for p in range(len(self.topic(t)))]
        for member in group.members:
            member.revoke()
        if not group.members:
            return
        for i, tp in enumerate(tps):
            group.members[i % len(group.members)].grant(tp)
        for member in group.members:
            member.granted()


def _partition(key: bytes | None, partitions: int) -> int:
    return partition_for(key, partitions) if key else 0


@dataclass(frozen=True)
class MemoryClients:
    """The node's client factory over one MemoryBroker."""

    broker: MemoryBroker

    def consumer(self, *topics: str, **options: Any) -> MemoryConsumer:
        consumer = MemoryConsumer(self.broker, **options)
        if topics:
            consumer.subscribe(list(topics))
        return consumer

    def producer(self, **options: Any) -> MemoryProducer:
        return MemoryProducer(self.broker)


class MemoryProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def start(self) -> None:
        self.broker.check()

    async def stop(self) -> None:
        pass

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> MemoryRecord:
        return await self.broker.append(topic, value, key, headers)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[MemoryRecord]:
        done: asyncio.Future[MemoryRecord] = asyncio.get_running_loop().create_future()
        done.set_result(await self.broker.append(topic, value, key, headers))
        return done

    async def metadata(self) -> None:
        self.broker.check()


class MemoryConsumer:
    """One client: either a group member (subscribe) or a plain reader (assign)."""

    def __init__(
        self,
        broker: MemoryBroker,
        group_id: str | None = None,
        auto_offset_reset: str = "latest",
        **_: Any,
    ) -> None:
        self.broker = broker
        self.group_id = group_id
        self.reset = auto_offset_reset
        self.subscribed: list[str] = []
        self.listener: Any = None
        self._assigned: list[TopicPartition] = []
        self._paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._pending: list[tuple[str, list[TopicPartition]]] = []
        self._new: list[TopicPartition] = []

    # -- group membership --------------------------------------------------------------

    async def start(self) -> None:
        self.broker.check()

    async def stop(self) -> None:
        self.unsubscribe()

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        assert self.group_id is not None, "subscribe needs a group_id"
        self.subscribed, self.listener = list(topics), listener
        group = self.broker.groups[self.group_id]
        if self not in group.members:
            group.members.append(self)
        self.broker.rebalance(self.group_id)

    def unsubscribe(self) -> None:
        if not self.subscribed or self.group_id is None:
            return
        self.subscribed = []
        group = self.broker.groups[self.group_id]
        if self in group.members:
            group.members.remove(self)
        self.revoke()
        self.broker.rebalance(self.group_id)

    def subscription(self) -> set[str]:
        return set(self.subscribed)

    def revoke(self) -> None:
        if self._assigned and self.listener is not None:
            self._pending.append(("revoked", list(self._assigned)))
        self._assigned, self._paused, self._new = [], set(), []

    def grant(self, tp: TopicPartition) -> None:
        self._assigned.append(tp)
        self._new.append(tp)

    def granted(self) -> None:
        for tp in self._new:
            self._positions[tp] = self._start(tp)
        if self.listener is not None:
            self._pending.append(("assigned", list(self._new)))
        self._new = []

    def _start(self, tp: TopicPartition) -> int:
        if self.group_id is not None:
            committed = self.broker.groups[self.group_id].committed.get(tp)
            if committed is not None:
                return committed
        return 0 if self.reset == "earliest" else len(self.broker.topic(tp.topic)[tp.partition])

    async def _run_listener(self) -> None:
        while self._pending:
            kind, tps = self._pending.pop(0)
            if kind == "revoked":
                await self.listener.on_partitions_revoked(tps)
            else:
                await self.listener.on_partitions_assigned(tps)

    # -- assignment and positions --------------------------------------------------------

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._assigned = list(partitions)
        for tp in partitions:
            self._positions[tp] = self._start(tp)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(len(self.broker.topic(topic))))

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._positions[partition] = offset

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or self._assigned:
            self._positions[tp] = 0

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in partitions or self._assigned:
            self._positions[tp] = len(self.broker.topic(tp.topic)[tp.partition])

    async def position(self, partition: TopicPartition) -> int:
        return self._positions.get(partition, 0)

    def highwater(self, partition: TopicPartition) -> int:
        return len(self.broker.topic(partition.topic)[partition.partition])

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        self.broker.check()
        return {tp: self.highwater(tp) for tp in partitions}

    async def beginning_offsets(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in partitions}

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        found: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, since in timestamps.items():
            records = self.broker.topic(tp.topic)[tp.partition]
            first = next((r for r in records if r.timestamp >= since), None)
            found[tp] = None if first is None else OffsetAndTimestamp(first.offset, first.timestamp)
        return found

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.broker.check()
        assert self.group_id is not None
        self.broker.groups[self.group_id].committed.update(offsets)

    async def committed(self, partition: TopicPartition) -> int | None:
        assert self.group_id is not None
        return self.broker.groups[self.group_id].committed.get(partition)

    # -- fetching ------------------------------------------------------------------------

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[MemoryRecord]]:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            await self._run_listener()
            batch = self._fetch(partitions, max_records) if self.broker.reachable else {}
            left = deadline - time.monotonic()
            if batch or left <= 0:
                return batch
            # Polling, not a Condition with wait_for: on Python 3.11 wait_for can swallow a
            # cancel that lands as the wait ends, and the caller's reader would never stop.
            await asyncio.sleep(min(left, 0.02))

    def _fetch(
        self, partitions: tuple[TopicPartition, ...], max_records: int | None
    ) -> dict[TopicPartition, list[MemoryRecord]]:
        batch: dict[TopicPartition, list[MemoryRecord]] = {}
        for tp in partitions or tuple(self._assigned):
            if tp in self._paused or tp not in self._assigned:
                continue
            start = self._positions.get(tp, 0)
            records = self.broker.topic(tp.topic)[tp.partition][start:]
            if max_records is not None:
                records = records[:max_records]
            if records:
                batch[tp] = list(records)
                self._positions[tp] = records[-1].offset + 1
        return batch
