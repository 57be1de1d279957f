"""A fleet of real `i2v worker` processes on the local stack, and a recorder of its events.

Each node is its own process, configured only through the environment, so killing,
freezing and terminating it are what an operator would do. The fleet proves delivery, not
generation: its nodes run the stand-in engine `pace:0.1` (each of a job's `infer_steps`
takes 0.1 s, then a real MP4 is stored), unless a test passes STANDIN_ENGINE="" for the
tiny model in an engine process of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import TypeAdapter

from i2v_fleet.producer_sdk.devstack import free_port
from i2v_fleet.producer_sdk.settings import KafkaSettings
from i2v_fleet.schemas import JOB_EVENT_ADAPTER, JobRequest, TopicNames
from tests.conftest import free_ports, ops_ready

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
_JSON: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
_PHOTO_B64 = base64.b64encode(PHOTO.read_bytes()).decode()


def cheap_job(**fields: Any) -> JobRequest:
    """The smallest real job: 480x832, 5 frames, 2 steps on the tiny model."""
    base: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "prompt": "she smiles",
        "image": {"base64": _PHOTO_B64},
        "image_size": "480*832",
        "num_frames": 5,
        "quality_preset": "custom",
        "infer_steps": 2,
        "guidance_scale": 2.0,
        "seed": 1,
        "metadata": {"suite": "fleet"},
    }
    return JobRequest.model_validate({**base, **fields})


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ops_port: int
    env: dict[str, str]
    started_at: float = field(default_factory=time.monotonic)

    def info(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/info", timeout=1) as r:
                return _JSON.validate_json(r.read())
        except OSError:
            return None

    @property
    def lanes(self) -> int:
        return int(self.env.get("LANES", "1"))

    def ready(self) -> bool:
        """Every lane's /readyz answers 200 (lane i serves on the node's port + i)."""
        return ops_ready(*range(self.ops_port, self.ops_port + self.lanes))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def engine_pid(self) -> int:
        """The node's engine process (its spawned child that is not a resource tracker)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                return int(child)
        raise AssertionError(f"no engine process among {children}")


class Fleet:
    """Starts, kills, freezes and stops worker nodes that share one set of topics."""

    def __init__(
        self,
        *,
        kafka: str,
        s3_endpoint: str,
        s3: Any,
        topics: TopicNames,
        model_dir: Path,
        tmp: Path,
        **env: str,
    ) -> None:
        self.tmp = tmp
        self.group = f"workers-{uuid.uuid4().hex[:6]}"
        self.base_env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "MINIO_ENDPOINT": s3_endpoint,
            "MINIO_ACCESS_KEY": s3.access_key,
            "MINIO_SECRET_KEY": s3.secret_key.get_secret_value(),
            "MINIO_BUCKET": s3.bucket,
            "MODEL_CKPT_DIR": str(model_dir),
            "DEVICE": "cpu",
            "WORKERS_GROUP": self.group,
            "REAPERS_GROUP": f"reapers-{uuid.uuid4().hex[:6]}",
            "HEARTBEAT_S": "0.5",
            "LEASE_S": "3",
            "LEASE_GRACE_S": "1",
            "REAPER_INTERVAL_S": "0.5",
            "PROGRESS_INTERVAL_S": "0.2",
            "NODE_INFO_INTERVAL_S": "2",
            "SHUTDOWN_GRACE": "1",
            "SERVER_HOST": "127.0.0.1",
            "KAFKA_SESSION_TIMEOUT_MS": "4000",
            "KAFKA_MAX_POLL_INTERVAL_MS": "6000",
            "OMP_NUM_THREADS": "1",
            "STANDIN_ENGINE": "pace:0.1",
            "I2V_TEST_TOOLS": "true",
            **{f"I2V_TOPIC_{role.upper()}": name for role, name in topics},
            **env,
        }
        self.nodes: dict[str, Node] = {}
        self.history: list[Node] = []

    def start(self, name: str, **env: str) -> Node:
        port = free_ports(int({**self.base_env, **env}.get("LANES", "1")))
        work = self.tmp / f"work-{name}"
        work.mkdir(exist_ok=True)
        node_env = {
            **self.base_env,
            "NODE_ID": name,
            "SERVER_PORT": str(port),
            "WORK_DIR": str(work),
            **env,
        }
        log = self.tmp / f"{name}-{len(self.history)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "i2v"), "worker"],
                env=node_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        node = Node(name, proc, log, port, node_env)
        self.nodes[name] = node
        self.history.append(node)
        return node

    def wait_ready(self, *names: str, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        for name in names or tuple(self.nodes):
            node = self.nodes[name]
            while not node.ready():
                if not node.running or time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not start:\n{self.tail(name)}")
                time.sleep(0.2)

    async def settled(self, partitions: int, *names: str, timeout: float = 60) -> None:
        """Until every named node claims from some partitions and together they cover all."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.nodes[n].info() for n in names or tuple(self.nodes)]
            owned = [set(i["requests_partitions"]) if i else set() for i in infos]
            if all(owned) and set().union(*owned) == set(range(partitions)):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the group did not settle: {owned}")
            await asyncio.sleep(0.3)

    def signal(self, name: str, sig: int) -> None:
        """Signal the node's supervisor process (what `kill -TERM <pid>` does)."""
        self.nodes[name].proc.send_signal(sig)

    def signal_tree(self, name: str, sig: int) -> None:
        """Signal the supervisor and its engine: the whole node hangs or resumes at once."""
        pid = self.nodes[name].proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for target in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        if node.running:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)

    def tail(self, name: str, chars: int = 4000) -> str:
        return self.nodes[name].log.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.send_signal(signal.SIGKILL)
                node.proc.wait(10)


class StatusLog:
    """Follows `i2v.status` from its start, recording each event with when it arrived."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.events: list[tuple[float, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None

    async def __aenter__(self) -> StatusLog:
        self._consumer = AIOKafkaConsumer(
            self.topic, **self.kafka.client_kwargs(), auto_offset_reset="earliest"
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _follow(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    with contextlib.suppress(ValueError):
                        self.events.append((now, JOB_EVENT_ADAPTER.validate_json(record.value)))

    def of(self, job_id: uuid.UUID) -> list[Any]:
        return [e for _, e in self.events if e.job_id == job_id]

    def final(self, job_id: uuid.UUID) -> Any:
        """The first final event of the job (what a client takes), or None."""
        return next((e for e in self.of(job_id) if e.type in _FINAL), None)

    def first(self, job_id: uuid.UUID, kind: str, **match: Any) -> tuple[float, Any] | None:
        for at, e in self.events:
            if (
                e.job_id == job_id
                and e.type == kind
                and all(getattr(e, k) == v for k, v in match.items())
            ):
                return at, e
        return None

    async def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.1)


_FINAL = ("succeeded", "failed", "cancelled")


async def publish(
    kafka: KafkaSettings, topic: str, records: list[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        **kafka.client_kwargs(), acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


class TcpProxy:
    """A TCP forwarder that can be taken down and brought back on the same port: an
    outage of whatever sits behind it, without losing that server's state."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
