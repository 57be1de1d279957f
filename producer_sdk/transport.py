"""The few Kafka calls the client makes, as a Protocol, and their aiokafka implementation.

Owns publishing with acks from all replicas and following chosen partitions from a point
in time. The client depends on `Transport` only, so `producer_sdk.testing` can stand in
for Kafka in users' tests. Must never let an aiokafka exception escape (BrokerError).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import BrokerError
from .settings import KafkaSettings


@dataclass(frozen=True)
class Record:
    """One record as the client sees it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


class Transport(Protocol):
    """What the client needs from a broker."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        """Publish with acks from all in-sync replicas; return (partition, offset)."""
        ...

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has."""
        ...

    def follow(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> AsyncIterator[Record]:
        """Records of exactly these partitions from `since_ms` (None: the start), forever."""
        ...

    async def read(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> list[Record]:
        """Records of these partitions from `since_ms` up to their current end."""
        ...

    async def backlog(self, topic: str, group: str) -> dict[int, int]:
        """Per partition of `topic`: records not yet committed by consumer group `group`."""
        ...


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for `key`.

    Java clients and aiokafka agree on it; librdkafka (confluent-kafka) does only when its
    producer is configured with `partitioner=murmur2_random`.
    """
    from aiokafka.partitioner import murmur2

    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


class KafkaTransport:
    """`Transport` over aiokafka."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: Any = None
        self.last_assignment: set[tuple[str, int]] = set()
        """The partitions the latest `follow` read (to check it reads no others)."""

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        self._producer = AIOKafkaProducer(
            **self.settings.client_kwargs(), acks="all", max_request_size=2 * 1024 * 1024
        )
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerError(
                f"cannot reach Kafka at {self.settings.bootstrap_servers}: {exc}; check "
                "KAFKA_BOOTSTRAP_SERVERS"
            ) from None

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def publish(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        from aiokafka.errors import KafkaError

        try:
            sent = await self._producer.send_and_wait(topic, value, key=key, headers=list(headers))
        except KafkaError as exc:
            raise BrokerError(f"could not publish to {topic}: {exc}") from None
        return int(sent.partition), int(sent.offset)

    async def partitions(self, topic: str) -> int:
        from aiokafka.errors import KafkaError

        try:
            found = await self._producer.partitions_for(topic)
        except KafkaError as exc:
            raise BrokerError(f"could not read the metadata of {topic}: {exc}") from None
        if not found:
            raise BrokerError(f"topic {topic} does not exist; create it with `i2v topics create`")
        return len(found)

    async def follow(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> AsyncIterator[Record]:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
            tps = [TopicPartition(t, p) for t, p in partitions]
            consumer.assign(tps)
            if since_ms is None:
                await consumer.seek_to_beginning(*tps)
            else:
                found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
                for tp in tps:
                    if found.get(tp) is not None:
                        consumer.seek(tp, found[tp].offset)
                    else:
                        await consumer.seek_to_end(tp)
            self.last_assignment = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            # Merge the partitions in timestamp order: a record is handed out only once every
            # other partition has something buffered or has been read to its end.
            buffers: dict[Any, deque[Any]] = {tp: deque() for tp in tps}
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for tp, records in batch.items():
                    buffers[tp].extend(records)
                while any(buffers.values()):
                    waiting = [
                        tp
                        for tp in tps
                        if not buffers[tp]
                        and await consumer.position(tp) < (consumer.highwater(tp) or 0)
                    ]
                    if waiting:
                        break
                    tp = min((t for t in tps if buffers[t]), key=lambda t: buffers[t][0].timestamp)
                    r = buffers[tp].popleft()
                    yield Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
        except KafkaError as exc:
            raise BrokerError(f"could not read {partitions}: {exc}") from None
        finally:
            await consumer.stop()

    async def read(
        self, partitions: Sequence[tuple[str, int]], since_ms: int | None
    ) -> list[Record]:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest"
        )
        found: list[Record] = []
        try:
            await consumer.start()
            tps = [TopicPartition(t, p) for t, p in partitions]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            if since_ms is None:
                await consumer.seek_to_beginning(*tps)
            else:
                starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
                for tp in tps:
                    consumer.seek(tp, starts[tp].offset if starts.get(tp) else ends[tp])
            pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=500)
                for tp, records in batch.items():
                    found += [
                        Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
                        for r in records
                        if r.offset < ends[tp]
                    ]
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        except KafkaError as exc:
            raise BrokerError(f"could not read {list(partitions)}: {exc}") from None
        finally:
            await consumer.stop()
        return sorted(found, key=lambda r: r.timestamp_ms)

    async def backlog(self, topic: str, group: str) -> dict[int, int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        # committed() of a consumer that never joins the group reads the group's offsets without
        # disturbing it; the admin client's offset listing is not supported by every broker.
        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(), group_id=group, enable_auto_commit=False
        )
        try:
            await consumer.start()
            partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            ends = await consumer.end_offsets(tps)
            backlog = {}
            for tp in tps:
                committed = await consumer.committed(tp)
                begin = (await consumer.beginning_offsets([tp]))[tp]
                backlog[tp.partition] = ends[tp] - max(
                    committed if committed is not None else begin, begin
                )
            return backlog
        except KafkaError as exc:
            raise BrokerError(f"could not read the backlog of {topic}: {exc}") from None
        finally:
            await consumer.stop()
