"""Membership of `i2v-workers` and the claim of one record at a time.

Owns the workers-group consumer: which record is claimed (the oldest partition head), what is
rewound, pausing while busy, leaving the group so idle nodes take the partitions, the commit.
Must never decide what a record means; the node admits and runs what this hands it.

One claim, in order:

    fetch      getmany() over every assigned partition
    choose     the oldest head (timestamp, partition, offset); every other partition is
               rewound to its first record fetched, so nothing fetched is skipped
    pause      all partitions, before the record is looked at
    admit      (the node) decode, cancel, ttl, `started` acked   -> or rewind on broker trouble
    commit     offset + 1: the claim is durable; the lease covers the attempt from here
    hold       while the job runs: stay a paused member, polling, or leave the group
               (LEAVE_GROUP_WHILE_BUSY) so an idle member gets the partitions
    resume     rejoin / unpause, ready for the next fetch
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from .kafka import Consumer

log = logging.getLogger(__name__)


class Claims:
    """The node's member of the workers group, and its claims on `topic`."""

    lag_check_s = 0.5
    """While busy and still a member: how often to look for records waiting behind the job."""

    def __init__(self, consumer: Consumer, topic: str, *, on_left: Callable[[], None]) -> None:
        self.consumer = consumer
        self.topic = topic
        self._on_left = on_left

    def partitions(self) -> list[int]:
        """The request partitions this node may claim from now (none while it is out)."""
        if not self.consumer.subscription():
            return []
        return sorted(tp.partition for tp in self.consumer.assignment())

    async def fetch(self) -> tuple[Any, bool] | None:
        """Join if out, fetch, and hand out the oldest head with every partition paused;
        with it, whether other records were fetched (they wait behind it)."""
        c = self.consumer
        if not c.subscription():
            c.subscribe([self.topic], listener=_ClaimsListener())
        batch = await c.getmany(timeout_ms=500)
        record = claim_oldest(c, batch)
        if record is None:
            return None
        c.pause(*c.assignment())
        return record, sum(len(records) for records in batch.values()) > 1

    def rewind(self, record: Any) -> None:
        """Fetch `record` again at the next `fetch` (its claim did not go through)."""
        self.consumer.seek(TopicPartition(record.topic, record.partition), record.offset)
        self.resume()

    async def commit(self, record: Any) -> bool:
        """Commit past `record`; False when the group moved meanwhile (another node may run
        the job again: results are idempotent)."""
        from aiokafka.errors import KafkaError

        tp = TopicPartition(record.topic, record.partition)
        try:
            await self.consumer.commit({tp: record.offset + 1})
        except KafkaError as exc:
            log.warning(
                "could not commit %s@%s after its claim (%s): the partition moved meanwhile, "
                "so another node may run it again; results are idempotent",
                tp,
                record.offset,
                exc,
            )
            return False
        return True

    def resume(self) -> None:
        if self.consumer.subscription():
            self.consumer.resume(*self.consumer.assignment())

    def leave(self) -> None:
        """LeaveGroup: a rebalance hands our partitions to the other members."""
        if self.consumer.subscription():
            self.consumer.unsubscribe()

    async def hold(
        self, task: asyncio.Future[Any], leave_now: Callable[[], Awaitable[bool]]
    ) -> None:
        """While `task` runs, stay a member with every partition paused, polling so the group
        keeps us, or leave the group once `leave_now()` says so (checked every lag_check_s)."""
        c = self.consumer
        next_check = 0.0
        leave = False
        while not task.done():
            if time.monotonic() >= next_check:
                leave = leave or await leave_now()
                next_check = time.monotonic() + self.lag_check_s
            if leave and c.subscription():
                c.unsubscribe()
                self._on_left()
            if not c.subscription():
                await asyncio.wait({task}, timeout=1.0)
                continue
            extra = await c.getmany(timeout_ms=200)
            for other, records in extra.items():  # handed to us by a rebalance meanwhile
                c.seek(other, records[0].offset)
            unpaused = set(c.assignment()) - set(c.paused())
            if unpaused:
                c.pause(*unpaused)

    async def records_waiting(self) -> bool:
        """True when a partition of ours has records past our position (waiting behind us)."""
        from aiokafka.errors import KafkaError

        assigned = list(self.consumer.assignment())
        if not assigned:
            return False
        try:
            ends = await self.consumer.end_offsets(assigned)
            for tp in assigned:
                if ends[tp] > await asyncio.wait_for(self.consumer.position(tp), 2.0):
                    return True
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.debug("lag check failed: %s", exc)
        return False


def claim_oldest(consumer: Consumer, batch: dict[Any, list[Any]]) -> Any:
    """The oldest record among the partition heads fetched; every partition is rewound to
    what it has not handed out, so nothing fetched is skipped."""
    heads = [records[0] for records in batch.values() if records]
    if not heads:
        return None
    chosen = min(heads, key=lambda r: (r.timestamp, r.partition, r.offset))
    for tp, records in batch.items():
        if records:
            consumer.seek(tp, records[0].offset + (1 if records[0] is chosen else 0))
    return chosen


class _ClaimsListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Says in the log which request partitions this node claims from after a rebalance."""

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("claiming from partitions %s", sorted(tp.partition for tp in assigned))
