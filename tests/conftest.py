"""Fixtures shared by every test: the local stack (or an external cluster) and fresh topics.

The stack starts once per session, only when a test asks for it, on free loopback ports
and in a private state directory, so it never collides with a developer's `i2v dev up`.
Set KAFKA_BOOTSTRAP_SERVERS and/or MINIO_ENDPOINT (with MINIO_ACCESS_KEY, MINIO_SECRET_KEY)
to run the same tests against a real cluster instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from i2v_fleet.producer_sdk.admin import create_topics
from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig, free_port
from i2v_fleet.producer_sdk.settings import KafkaSettings, ObjectStoreSettings
from i2v_fleet.schemas import TopicNames, topic_specs

pytest_plugins = ["tests.mypy_beside"]


@dataclass(frozen=True)
class Cluster:
    """Where the tests' Kafka and S3 live."""

    kafka: KafkaSettings
    s3: ObjectStoreSettings
    stack: DevStack | None
    """The local stack when the tests started one, None on an external cluster."""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The broker and object store for integration tests, started once per session."""
    external_kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    external_s3 = os.environ.get("MINIO_ENDPOINT")
    stack: DevStack | None = None
    if not (external_kafka and external_s3):
        stack = DevStack(
            StackConfig(
                state_dir=Path(tmp_path_factory.mktemp("stack")),
                kafka_port=free_port(),
                s3_port=free_port(),
                partitions=4,
                bucket=f"i2v-test-{uuid.uuid4().hex[:8]}",
            )
        )
        stack.up()
    c = stack.config if stack else None
    kafka = (
        KafkaSettings()
        if external_kafka
        else KafkaSettings(bootstrap_servers=c.bootstrap_servers if c else "")
    )
    s3 = (
        ObjectStoreSettings()
        if external_s3
        else ObjectStoreSettings(
            endpoint=c.s3_endpoint if c else "",
            access_key=c.access_key if c else "",
            secret_key=SecretStr(c.secret_key if c else ""),
            bucket=c.bucket if c else "",
        )
    )
    try:
        yield Cluster(kafka=kafka, s3=s3, stack=stack)
    finally:
        if stack is not None:
            stack.down()


@pytest.fixture(scope="session")
def durable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second local stack whose broker keeps its log in a bucket of its S3 server, for
    tests that crash and restart the broker; started once per session, only when asked for.

    Always local, whatever KAFKA_BOOTSTRAP_SERVERS says: the tests kill its broker.
    """
    stack = DevStack(
        StackConfig(
            state_dir=Path(tmp_path_factory.mktemp("durable-stack")),
            kafka_port=free_port(),
            s3_port=free_port(),
            partitions=2,
            bucket=f"i2v-test-{uuid.uuid4().hex[:8]}",
            durable=True,
        )
    )
    try:
        stack.up()
        c = stack.config
        yield Cluster(
            kafka=KafkaSettings(bootstrap_servers=c.bootstrap_servers),
            s3=ObjectStoreSettings(
                endpoint=c.s3_endpoint,
                access_key=c.access_key,
                secret_key=SecretStr(c.secret_key),
                bucket=c.bucket,
            ),
            stack=stack,
        )
    finally:
        stack.down()


@pytest.fixture
def kafka(cluster: Cluster) -> KafkaSettings:
    """Connection settings of the test broker."""
    return cluster.kafka


@pytest.fixture
def s3(cluster: Cluster) -> ObjectStoreSettings:
    """Connection settings of the test object store (its bucket exists)."""
    if cluster.stack is None:
        from minio import Minio

        client = Minio(
            cluster.s3.endpoint,
            cluster.s3.access_key,
            cluster.s3.secret_key.get_secret_value(),
            secure=cluster.s3.secure,
        )
        if not client.bucket_exists(cluster.s3.bucket):
            client.make_bucket(cluster.s3.bucket)
    return cluster.s3


@pytest.fixture
def topics(kafka: KafkaSettings) -> TopicNames:
    """A fresh set of the six topics, unique to this test, so tests never see each other."""
    names = TopicNames().with_suffix(f".t{uuid.uuid4().hex[:10]}")
    asyncio.run(create_topics(kafka, topic_specs(names, partitions=4)))
    return names


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.1 I2V checkpoint in the diffusers layout, written once per session."""
    from i2v_fleet.pipeline import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Any:
    """The tiny model loaded once, as a worker loads it, on the CPU."""
    from i2v_fleet.pipeline import WanI2V

    return WanI2V.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def worker_topics(cluster: Cluster) -> TopicNames:
    """Topics of this module's worker, fresh."""
    names = TopicNames().with_suffix(f".w{uuid.uuid4().hex[:8]}")
    asyncio.run(create_topics(cluster.kafka, topic_specs(names, partitions=2)))
    return names


@pytest.fixture(scope="module")
def worker(
    cluster: Cluster,
    worker_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[subprocess.Popen[bytes]]:
    """`i2v worker` in its own process, configured only through the environment."""
    yield from run_worker(cluster, worker_topics, tiny_model_dir, tmp_path_factory, {})


def run_worker(
    cluster: Cluster,
    topics: TopicNames,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    extra_env: dict[str, str],
    ready_marks: int = 1,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `i2v worker` with the test settings plus `extra_env`, wait until every lane's
    /readyz answers 200, yield it, stop it and print its log's tail.

    The lanes are LANES of the environment; `ready_marks` (once the count of log lines to
    wait for, one per lane) is a lower bound on them, kept for callers.
    """
    lanes = max(ready_marks, int({**os.environ, **extra_env}.get("LANES", "1")))
    ops_port = free_ports(lanes)
    group = f"workers-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.kafka.bootstrap_servers,
        "MINIO_ENDPOINT": cluster.s3.endpoint,
        "MINIO_ACCESS_KEY": cluster.s3.access_key,
        "MINIO_SECRET_KEY": cluster.s3.secret_key.get_secret_value(),
        "MINIO_BUCKET": cluster.s3.bucket,
        "MODEL_CKPT_DIR": str(model_dir),
        "DEVICE": "cpu",
        "NODE_ID": "test-node-1",
        "WORKERS_GROUP": group,
        "WORK_DIR": str(tmp_path_factory.mktemp("work")),
        "HEARTBEAT_S": "1",
        "LEASE_S": "10",
        # Above the longest silent phase of a cheap job here (VAE decoding, ~8 s).
        "ENGINE_STALL_TIMEOUT": "20",
        "PROGRESS_INTERVAL_S": "0.1",
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(ops_port),
        "NODE_INFO_INTERVAL_S": "2",
        # Far below a job's run time: the worker must stay a member while it computes.
        "KAFKA_MAX_POLL_INTERVAL_MS": "3000",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        **{f"I2V_TOPIC_{role.upper()}": name for role, name in topics},
        **extra_env,
    }
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "i2v"), "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while not ops_ready(*range(ops_port, ops_port + lanes)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.ops_url = f"http://127.0.0.1:{ops_port}"  # type: ignore[attr-defined]
    proc.group = group  # type: ignore[attr-defined]
    proc.log = log  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(log.read_text()[-5000:])


def ops_ready(*ports: int) -> bool:
    """True when the node's ops server answers /readyz with 200 on every one of `ports`
    (a node of LANES lanes serves one per lane, on SERVER_PORT + lane)."""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status != 200:
                    return False
        except OSError:  # not listening yet, or 503 (HTTPError is an OSError)
            return False
    return True


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports nobody listens on right now: a
    node's lanes take SERVER_PORT, SERVER_PORT + 1, ..."""
    for _ in range(50):
        first = free_port()
        if all(_port_free(first + i) for i in range(1, count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
