"""The node's Kafka seam: the client calls it makes, as Protocols, and the factory for them.

Owns which calls the node depends on, so its behaviour is testable in-process with clients
that keep records in memory. Must never hold node policy: production builds aiokafka's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.structs import TopicPartition


class ConsumerRecord(Protocol):
    """The fields of a fetched record that the node reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class Consumer(Protocol):
    """The consumer calls the node's claim loop, reaper and watchers make."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, topics: list[str], listener: Any = None) -> None: ...
    def unsubscribe(self) -> None: ...
    def subscription(self) -> set[str]: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def seek_to_beginning(self, *partitions: TopicPartition) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]: ...
    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    async def end_offsets(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]: ...
    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, Any]: ...


class Producer(Protocol):
    """The producer calls the node makes (events, re-publishes, DLQ copies, metadata probes)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any: ...
    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]: ...
    async def metadata(self) -> None:
        """Ask the broker for cluster metadata (the broker watch's probe)."""


class KafkaClients(Protocol):
    """Builds the node's clients: one producer, and consumers for claims, cancels, peers
    and the reaper. `options` are aiokafka's keyword arguments (group_id, ...)."""

    def consumer(self, *topics: str, **options: Any) -> Consumer: ...
    def producer(self, **options: Any) -> Producer: ...


@dataclass(frozen=True)
class AioKafkaClients:
    """aiokafka's clients, with the connection keyword arguments of WorkerSettings."""

    connection: dict[str, Any] = field(default_factory=dict)

    def consumer(self, *topics: str, **options: Any) -> Consumer:
        from aiokafka import AIOKafkaConsumer

        client: Consumer = AIOKafkaConsumer(*topics, **self.connection, **options)
        return client

    def producer(self, **options: Any) -> Producer:
        return _AioProducer(**self.connection, **options)


class _AioProducer:
    """aiokafka's producer behind the Producer protocol (plus the metadata probe)."""

    def __init__(self, **options: Any) -> None:
        from aiokafka import AIOKafkaProducer

        self._producer = AIOKafkaProducer(**options)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        return await self._producer.send_and_wait(topic, value, key=key, headers=headers)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        sent: Awaitable[Any] = await self._producer.send(topic, value, key=key, headers=headers)
        return sent

    async def metadata(self) -> None:
        await self._producer.client.fetch_all_metadata()
