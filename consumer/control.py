"""What every node follows in full, without a consumer group: cancels and peers.

Owns the set of cancelled job ids (`i2v.control`) and the last word of every node
(`i2v.nodes`), each read from the start of its compacted topic and kept current.
Must never block the loop or commit anything: these are plain readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from i2v_fleet.schemas import (
    CANCEL_ADAPTER,
    NODE_INFO_ADAPTER,
    CancelRequest,
    NodeInfo,
    NodeState,
    utcnow,
)

from .kafka import KafkaClients

log = logging.getLogger(__name__)


class TopicFollower:
    """Reads a whole topic from its start, then follows it; subclasses say what a record
    means in `_apply`."""

    def __init__(self, clients: KafkaClients, topic: str) -> None:
        self.clients = clients
        self.topic = topic
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._consumer: Any = None

    @property
    def alive(self) -> bool:
        """True while the reader task runs (for /readyz)."""
        return self._task is not None and not self._task.done()

    def _apply(self, record: Any) -> None:
        raise NotImplementedError

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start following and wait until the existing cancels are read."""
        from aiokafka import TopicPartition

        consumer = self.clients.consumer(enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer.stop()
            raise RuntimeError(
                f"topic {self.topic} does not exist; create the topics with `i2v topics create`"
            )
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(ends), name=f"follow-{self.topic}")
        await asyncio.wait_for(self._caught_up.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _follow(self, ends: dict[Any, int]) -> None:
        consumer = self._consumer
        if all(end == 0 for end in ends.values()):
            self._caught_up.set()
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500)
            except Exception as exc:
                # A cancel missed because this reader died would let a job run to the end:
                # never stop following; say so and try again.
                log.warning("reading %s failed (%s); retrying", self.topic, exc)
                await asyncio.sleep(1.0)
                continue
            for records in batch.values():
                for record in records:
                    self._apply(record)
            if not self._caught_up.is_set():
                positions = {tp: await consumer.position(tp) for tp in ends}
                if all(positions[tp] >= end for tp, end in ends.items()):
                    self._caught_up.set()


class ControlWatcher(TopicFollower):
    """Follows `i2v.control`; `cancelled(job_id)` answers from memory."""

    def __init__(self, clients: KafkaClients, topic: str) -> None:
        super().__init__(clients, topic)
        self._cancels: dict[UUID, CancelRequest] = {}

    def cancelled(self, job_id: UUID) -> CancelRequest | None:
        return self._cancels.get(job_id)

    def _apply(self, record: Any) -> None:
        if record.value is None:  # a tombstone clears a cancel
            with contextlib.suppress(ValueError, AttributeError, UnicodeDecodeError):
                self._cancels.pop(UUID(record.key.decode()), None)
            return
        try:
            cancel = CANCEL_ADAPTER.validate_json(record.value)
        except ValidationError:
            log.warning(
                "ignoring an undecodable cancel at %s offset %s", record.partition, record.offset
            )
            return
        self._cancels[cancel.job_id] = cancel


class PeerWatcher(TopicFollower):
    """Follows `i2v.nodes`; `idle_peers()` names the other nodes that are claiming now."""

    def __init__(self, clients: KafkaClients, topic: str, node_id: str) -> None:
        super().__init__(clients, topic)
        self.node_id = node_id
        self._last: dict[str, NodeInfo] = {}

    def idle_peers(self, max_age_s: float, idle_for_s: float) -> list[str]:
        """Other nodes whose latest word, at most `max_age_s` old, is that they have been
        `ready` (idle) for `idle_for_s` at least: a node that just finished a job and is
        about to claim its next one does not count."""
        now = utcnow()
        return sorted(
            info.node_id
            for info in self._last.values()
            if info.node_id != self.node_id
            and info.state is NodeState.READY
            and (now - info.time).total_seconds() <= max_age_s
            and (now - (info.state_since or info.time)).total_seconds() >= idle_for_s
        )

    def _apply(self, record: Any) -> None:
        if record.value is None:
            with contextlib.suppress(AttributeError, UnicodeDecodeError):
                self._last.pop(record.key.decode(), None)
            return
        try:
            info = NODE_INFO_ADAPTER.validate_json(record.value)
        except ValidationError:
            return  # another version's record or garbage: not a peer we can reason about
        self._last[info.node_id] = info
