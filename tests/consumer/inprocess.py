"""A whole node in the test's own event loop: the real supervisor and its parts, Kafka in
memory behind the node's seam, a stand-in engine, and the real local S3 server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from i2v_fleet.consumer.engine.standin import StandInEngine
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.consumer.supervisor import Supervisor
from i2v_fleet.consumer.worker import build
from i2v_fleet.producer_sdk.settings import ObjectStoreSettings
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    NODE_INFO_ADAPTER,
    PROGRESS_ADAPTER,
    CancelRequest,
    EventType,
    JobRequest,
    NodeInfo,
    TopicNames,
)

from .memory_kafka import MemoryBroker, MemoryRecord

FAST = {
    "heartbeat_s": 0.3,
    "lease_s": 5.0,
    "node_info_interval_s": 0.5,
    "progress_interval_s": 0.0,
    "broker_check_s": 0.2,
    "shutdown_grace": 1.0,
    "shutdown_hand_back_s": 5.0,
    "server_host": "127.0.0.1",
    "server_port": 0,
}


def node_settings(s3: ObjectStoreSettings, work: Path, **fields: Any) -> WorkerSettings:
    """A node's settings for in-process tests: the local S3 server, short intervals."""
    values: dict[str, Any] = {
        "node_id": f"node-{uuid.uuid4().hex[:6]}",
        "minio_endpoint": s3.endpoint,
        "minio_access_key": s3.access_key,
        "minio_secret_key": SecretStr(s3.secret_key.get_secret_value()),
        "minio_bucket": s3.bucket,
        "minio_secure": s3.secure,
        "work_dir": work,
        "allowed_hosts": "*",
        **FAST,
        **fields,
    }
    return WorkerSettings(**values)


@dataclass
class Node:
    """A running in-process node and the broker it claims from."""

    supervisor: Supervisor
    broker: MemoryBroker
    task: asyncio.Task[None]

    @property
    def engine(self) -> StandInEngine:
        engine = self.supervisor.engine
        assert isinstance(engine, StandInEngine)
        return engine

    @property
    def topics(self) -> TopicNames:
        return self.supervisor.topics

    async def stop(self, timeout: float = 30.0) -> None:
        self.supervisor.stop()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


@contextlib.asynccontextmanager
async def running_node(
    settings: WorkerSettings, broker: MemoryBroker | None = None
) -> AsyncIterator[Node]:
    """Start a node on `broker` (a fresh one by default), ready to claim; stop it after."""
    broker = broker or MemoryBroker(partitions=2)
    supervisor = build(settings, clients=broker.clients())
    task = asyncio.create_task(supervisor.run())
    ready = asyncio.create_task(supervisor.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
    assert supervisor.ready.is_set(), "the node did not become ready in 30 s"
    node = Node(supervisor, broker, task)
    try:
        yield node
    finally:
        if not task.done():
            await node.stop()


async def submit(
    broker: MemoryBroker,
    job: JobRequest | bytes,
    key: bytes | None = None,
    partition: int | None = None,
    topics: TopicNames | None = None,
) -> None:
    topic = (topics or TopicNames()).requests
    if isinstance(job, JobRequest):
        await broker.append(topic, job.model_dump_json().encode(), job.key, None, partition)
    else:
        await broker.append(topic, job, key, None, partition)


async def cancel(broker: MemoryBroker, job: JobRequest, reason: str) -> None:
    value = CancelRequest(job_id=job.job_id, reason=reason).model_dump_json().encode()
    await broker.append(TopicNames().control, value, job.key, None)


def status(broker: MemoryBroker, job_id: uuid.UUID) -> list[Any]:
    """Every status event of the job so far (heartbeats included), in order."""
    key = str(job_id).encode()
    return [
        JOB_EVENT_ADAPTER.validate_json(r.value or b"")
        for r in broker.records(TopicNames().status)
        if r.key == key
    ]


def lifecycle(broker: MemoryBroker, job_id: uuid.UUID) -> list[tuple[str, int]]:
    return [(e.type, e.attempt) for e in status(broker, job_id) if e.type != "heartbeat"]


def progress(broker: MemoryBroker, job_id: uuid.UUID) -> list[Any]:
    key = str(job_id).encode()
    return [
        PROGRESS_ADAPTER.validate_json(r.value or b"")
        for r in broker.records(TopicNames().progress)
        if r.key == key
    ]


def dead_letters(broker: MemoryBroker) -> list[MemoryRecord]:
    return broker.records(TopicNames().dlq)


def node_infos(broker: MemoryBroker, node_id: str) -> list[NodeInfo]:
    return [
        NODE_INFO_ADAPTER.validate_json(r.value or b"")
        for r in broker.records(TopicNames().nodes)
        if r.key == node_id.encode()
    ]


async def until(check: Any, timeout: float = 20.0, what: str = "") -> None:
    """Wait until `check()` is true, polling."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(0.02)


async def final(broker: MemoryBroker, job_id: uuid.UUID, timeout: float = 20.0) -> Any:
    """The job's first final event (waits for it)."""

    def found() -> Any:
        return next((e for e in status(broker, job_id) if EventType(e.type).is_terminal()), None)

    await until(lambda: found() is not None, timeout, f"a final event of {job_id}")
    return found()
