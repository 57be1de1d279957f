"""A worker node's memory under a hostile request stream, with a few real jobs mixed in.

Run: `.venv/bin/python benchmarks/hostile_rss.py [--hostile 200] [--valid 3] [--timeout 300]`.
Starts the local stack (Kafka and S3 on free loopback ports, 2 request partitions), writes
the tiny model and starts a real `i2v worker` with the test suite's settings. Once /readyz
answers 200 it publishes K cheap valid jobs (480x832, 5 frames, 2 steps, the sample photo
inline) evenly among M hostile records. The first hostile record is a complete 64 MP RGBA
PNG (a quarter of a MiB as a file), decoded in full and then run as a job; the others cycle
through invalid JSON, random bytes, deep nesting, a 512 KiB field name, control characters,
wrong-typed fields, a 9000x9000 PNG refused from its header, a 64 MP RGBA PNG cut short
(allocated and decoded, then refused as truncated) and a GIF sent as an image.

Every 0.2 s it samples the RSS of the worker's process tree (the supervisor, the engine and
their children; from /proc, so Linux only). It prints, per process and for the tree: the
warm baseline (after ready, before the stream), the sampled peak over it, the kernel's
high-water mark over it (VmHWM, reset at the baseline) and the RSS once the stream is
done; then which valid jobs finished and how the hostile records were answered.

Nothing is asserted. The run ends when every record is answered (a final event for each job
id, a dead letter for each record without one) or at --timeout, whichever comes first, and
names the valid jobs that never finished: a record that wedges a partition shows up there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from i2v_fleet.connection import free_port
from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig
from i2v_fleet.schemas import JOB_EVENT_ADAPTER, EventType, JobRequest, TopicNames

MiB = 1024 * 1024
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "grace_hopper.jpg"


# -- the stream ---------------------------------------------------------------------------


def cheap_job(**fields: Any) -> JobRequest:
    """The worker tests' cheap job: the smallest size, 5 frames, 2 steps."""
    base: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "prompt": "she smiles",
        "image": {"base64": base64.b64encode(PHOTO.read_bytes()).decode()},
        "image_size": "480*832",
        "num_frames": 5,
        "quality_preset": "custom",
        "infer_steps": 2,
        "guidance_scale": 2.0,
        "seed": 1,
        "metadata": {"suite": "hostile_rss"},
    }
    return JobRequest.model_validate({**base, **fields})


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims another size."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


Record = tuple[bytes, str | None]
"""A record's value and the job id it carries, where one is readable."""


def _with_image(data: bytes, **fields: Any) -> Callable[[], Record]:
    """Cheap jobs carrying `data` inline (the schema caps it at 1 MiB decoded), each with a
    job id of its own."""
    inline = base64.b64encode(data).decode()

    def make() -> Record:
        job = cheap_job(image={"base64": inline}, **fields)
        return job.model_dump_json().encode(), str(job.job_id)

    return make


def _raw_job(**fields: Any) -> Callable[[], Record]:
    """Cheap jobs' JSON with fields replaced without validation, as a hostile client sends."""

    def make() -> Record:
        job = cheap_job().model_dump(mode="json") | fields
        return json.dumps(job).encode(), str(job["job_id"])

    return make


def _fixed(value: bytes) -> Callable[[], Record]:
    return lambda: (value, None)


class Hostile:
    """The kinds of hostile record, published round-robin."""

    def __init__(self) -> None:
        big = Image.new("RGBA", (8000, 8000), (30, 120, 200, 128))  # 64 MP: 244 MiB decoded
        whole = _png(big)
        del big
        self.kinds: dict[str, Callable[[], Record]] = {
            "invalid JSON": _fixed(b'{"job_id": "1", "prompt": "unterminated'),
            "random bytes": _fixed(os.urandom(2048)),
            "deep nesting": _fixed(b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
            "huge field name": _fixed(b'{"' + b"k" * (512 * 1024) + b'": 1}'),
            "control characters": _raw_job(prompt="\x00\x01\x1b[2J\x7f" * 200),
            "wrong types": _raw_job(num_frames="many", image_size=[480, 832], seed={"x": 1}),
            "PNG claiming 9000x9000": _with_image(_claiming(9000, 9000)),
            "64 MP PNG cut short": _with_image(whole[: len(whole) - 4096]),
            "GIF as an image": _with_image(b"GIF89a" + b"\0" * 64),
        }
        # Decoded in full and then run as a job (its video is 5 frames): sent once, first.
        self.first = ("64 MP PNG, complete", _with_image(whole))

    def record(self, i: int) -> tuple[str, Record]:
        if i == 0:
            return self.first[0], self.first[1]()
        name = list(self.kinds)[(i - 1) % len(self.kinds)]
        return name, self.kinds[name]()


# -- the worker ---------------------------------------------------------------------------


def worker_env(stack: DevStack, model_dir: Path, work: Path, ops_port: int) -> dict[str, str]:
    """The environment tests/conftest.py's run_worker gives `i2v worker`."""
    c = stack.config
    topics: TopicNames = c.topics
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": c.bootstrap_servers,
        "MINIO_ENDPOINT": c.s3_endpoint,
        "MINIO_ACCESS_KEY": c.access_key,
        "MINIO_SECRET_KEY": c.secret_key,
        "MINIO_BUCKET": c.bucket,
        "MODEL_CKPT_DIR": str(model_dir),
        "DEVICE": "cpu",
        "NODE_ID": "bench-node-1",
        "WORKERS_GROUP": f"workers-{uuid.uuid4().hex[:6]}",
        "WORK_DIR": str(work),
        "HEARTBEAT_S": "1",
        "LEASE_S": "10",
        "ENGINE_STALL_TIMEOUT": "20",
        "PROGRESS_INTERVAL_S": "0.1",
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(ops_port),
        "NODE_INFO_INTERVAL_S": "2",
        "KAFKA_MAX_POLL_INTERVAL_MS": "3000",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        **{f"I2V_TOPIC_{role.upper()}": name for role, name in topics},
    }


def wait_ready(proc: subprocess.Popen[bytes], ops_port: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{ops_port}/readyz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the worker was not ready within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


# -- RSS of the process tree ----------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (its 4th field is the parent)."""
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        found.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return found


def _tree(root: int) -> list[int]:
    children, pids = _children(), [root]
    for pid in pids:  # grows while iterating: breadth first
        pids.extend(children.get(pid, []))
    return pids


def _describe(pid: int, root: int) -> str:
    if pid == root:
        return "supervisor"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmd = ""
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "engine" if "spawn_main" in cmd else "child"


@dataclass
class Sampler:
    """Samples the RSS of a process and its descendants every `interval_s` in a thread."""

    root: int
    interval_s: float = 0.2
    names: dict[int, str] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)
    peak_tree: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rss(self) -> dict[int, int]:
        """The RSS in bytes of every live process of the tree now, by pid."""
        found: dict[int, int] = {}
        for pid in _tree(self.root):
            kib = _status_kib(pid, "VmRSS")
            if kib is None:
                continue
            found[pid] = kib * 1024
            if pid not in self.names:
                self.names[pid] = _describe(pid, self.root)
        return found

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = self.rss()
            for pid, rss in now.items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self.peak_tree = max(self.peak_tree, sum(now.values()))


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm(pid: int) -> bool:
    """Set the kernel's peak RSS (VmHWM) of `pid` to its RSS now; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- publish and follow -------------------------------------------------------------------


@dataclass
class Outcome:
    valid: dict[str, str] = field(default_factory=dict)
    """job id -> final event type (with the error code of a failure); absent: unfinished."""
    hostile: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    expected_dlq: int = 0
    published_s: float = 0.0
    done_s: float | None = None
    """When every valid job had its final event; None: not within the timeout."""
    settled_s: float | None = None
    """When every record, hostile ones too, had been answered; None: not within the timeout."""


async def run_stream(
    stack: DevStack, valid: list[JobRequest], hostile: Hostile, m: int, timeout_s: float
) -> tuple[Outcome, dict[str, str]]:
    """Publish the interleaved stream and follow the status and dead-letter topics until
    every record is answered (a final event for each job id, a dead letter for each record
    without one) or `timeout_s` passed. Returns the outcome and the hostile job ids never
    answered, with their kind."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topics: TopicNames = stack.config.topics
    servers = stack.config.bootstrap_servers
    outcome = Outcome()
    kind_of: dict[str, str] = {}  # hostile job ids (where one was readable) -> kind
    valid_ids = {str(j.job_id) for j in valid}
    consumer = AIOKafkaConsumer(
        topics.status,
        topics.dlq,
        bootstrap_servers=servers,
        auto_offset_reset="earliest",  # a fresh stack: only this run's events
        enable_auto_commit=False,
    )
    await consumer.start()
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    started = time.monotonic()
    try:
        total = len(valid) + m
        every = total / max(1, len(valid))
        slots = {int(i * every + every / 2) for i in range(len(valid))}
        jobs, h, with_id = iter(valid), 0, 0
        for i in range(total):
            if i in slots:
                job = next(jobs)
                await producer.send(topics.requests, job.model_dump_json().encode(), key=job.key)
            else:
                name, (value, job_id) = hostile.record(h)
                h += 1
                if job_id:
                    kind_of[job_id] = name
                    with_id += 1
                await producer.send(topics.requests, value, key=job_id.encode() if job_id else None)
        await producer.flush()
        outcome.published_s = time.monotonic() - started
        expected_dlq = h - with_id  # hostile records without a readable job id
        deadline = started + timeout_s

        def settled() -> bool:
            return (
                valid_ids <= outcome.valid.keys()
                and not kind_of
                and outcome.dead_letters >= expected_dlq
            )

        while time.monotonic() < deadline and not settled():
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if tp.topic == topics.dlq:
                        outcome.dead_letters += 1
                    else:
                        _follow(record.value, valid_ids, kind_of, outcome)
            if outcome.done_s is None and valid_ids <= outcome.valid.keys():
                outcome.done_s = time.monotonic() - started
        outcome.expected_dlq = expected_dlq
        outcome.settled_s = time.monotonic() - started if settled() else None
    finally:
        await producer.stop()
        await consumer.stop()
    return outcome, kind_of


def _follow(value: bytes, valid_ids: set[str], kind_of: dict[str, str], out: Outcome) -> None:
    try:
        event = JOB_EVENT_ADAPTER.validate_json(value)
    except ValueError:
        return
    if not EventType(event.type).is_terminal():
        return
    job_id = str(event.job_id)
    code = getattr(getattr(event, "error", None), "code", None)
    ended = f"{event.type}/{code}" if code else event.type
    if job_id in valid_ids:
        out.valid.setdefault(job_id, ended)
    elif job_id in kind_of:
        out.hostile[f"{kind_of.pop(job_id)}: {ended}"] += 1


# -- the run ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=200, help="hostile records (M)")
    parser.add_argument("--valid", type=int, default=3, help="cheap valid jobs (K)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the stream, s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hostile = Hostile()
    lines: list[str] = []

    def say(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        stack = DevStack(
            StackConfig(
                state_dir=tmp / "stack", kafka_port=free_port(), s3_port=free_port(), partitions=2
            )
        )
        stack.up()
        proc: subprocess.Popen[bytes] | None = None
        log = tmp / "worker.log"
        try:
            from i2v_fleet.pipeline import write_tiny_model

            model = write_tiny_model(tmp / "model")
            ops_port = free_port()
            (tmp / "work").mkdir()
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [str(Path(sys.executable).parent / "i2v"), "worker"],
                    env=worker_env(stack, model, tmp / "work", ops_port),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            t0 = time.monotonic()
            wait_ready(proc, ops_port, log, 180)
            say(f"# worker ready in {time.monotonic() - t0:.1f} s; settling 5 s")
            time.sleep(5)
            sampler = Sampler(proc.pid)
            baseline = _median_rss(sampler, 2.0)
            hwm_reset = all(_reset_hwm(pid) for pid in baseline)
            sampler.start()
            valid = [cheap_job() for _ in range(args.valid)]
            outcome, unread = asyncio.run(
                run_stream(stack, valid, hostile, args.hostile, args.timeout)
            )
            time.sleep(3)
            sampler.stop()
            after = _median_rss(sampler, 2.0)
            hwm = {pid: _status_kib(pid, "VmHWM") for pid in sampler.names}
            report(say, args, sampler, baseline, after, hwm, hwm_reset, valid, outcome, unread)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stack.down()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def _median_rss(sampler: Sampler, seconds: float) -> dict[int, int]:
    samples: dict[int, list[int]] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pid, rss in sampler.rss().items():
            samples.setdefault(pid, []).append(rss)
        time.sleep(0.2)
    return {pid: int(np.median(v)) for pid, v in samples.items()}


def report(
    say: Callable[[str], None],
    args: argparse.Namespace,
    sampler: Sampler,
    baseline: dict[int, int],
    after: dict[int, int],
    hwm: dict[int, int | None],
    hwm_reset: bool,
    valid: list[JobRequest],
    outcome: Outcome,
    unread: dict[str, str],
) -> None:
    say(
        f"# {args.hostile} hostile records, {args.valid} valid jobs; published in "
        f"{outcome.published_s:.1f} s; "
        + (
            f"all valid jobs final after {outcome.done_s:.1f} s"
            if outcome.done_s is not None
            else f"NOT all valid jobs final within --timeout {args.timeout:g} s"
        )
        + (
            f"; every record answered after {outcome.settled_s:.1f} s"
            if outcome.settled_s is not None
            else "; NOT every record answered"
        )
    )
    hwm_note = "" if hwm_reset else " (VmHWM not reset: since process start)"
    say(
        f"{'process':<22} {'baseline':>9} {'peak':>9} {'peak-base':>9} "
        f"{'HWM-base':>9} {'after':>9}   MiB{hwm_note}"
    )

    def mib(n: float | None) -> str:
        return f"{n / MiB:9.1f}" if n is not None else f"{'-':>9}"

    for pid, name in sampler.names.items():
        base = baseline.get(pid)
        peak = sampler.peak.get(pid)
        kib = hwm.get(pid)
        high = kib * 1024 if kib is not None else None
        say(
            f"{name + f' ({pid})':<22} {mib(base)} {mib(peak)} "
            f"{mib(peak - base if peak is not None and base is not None else None)} "
            f"{mib(high - base if high is not None and base is not None else None)} "
            f"{mib(after.get(pid))}"
        )
    tree_base = sum(baseline.values())
    say(
        f"{'tree (sum)':<22} {mib(tree_base)} {mib(sampler.peak_tree)} "
        f"{mib(sampler.peak_tree - tree_base)} {mib(None)} {mib(sum(after.values()))}"
    )
    finished = sum(1 for j in valid if str(j.job_id) in outcome.valid)
    say(f"# valid jobs: {finished} of {len(valid)} final")
    for j in valid:
        say(f"  {j.job_id}  {outcome.valid.get(str(j.job_id), 'NOT FINISHED')}")
    say(
        f"# hostile records: {outcome.dead_letters} dead letters (of {outcome.expected_dlq} "
        "without a readable job id); final events by kind:"
    )
    for kind, n in sorted(outcome.hostile.items()):
        say(f"  {n:4d}  {kind}")
    waiting = Counter(unread.values())
    for kind, n in sorted(waiting.items()):
        say(f"  {n:4d}  {kind}: no final event seen")


if __name__ == "__main__":
    main()
