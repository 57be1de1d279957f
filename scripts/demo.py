"""The local demo: a worker, a job with a sample photo, progress, and the finished MP4.

Run through `scripts/demo`, which sets up .venv, starts the local stack, writes the tiny
model and exports the settings first. Everything here goes through Kafka and MinIO.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from i2v_fleet.connection import free_port
from i2v_fleet.producer_sdk import KafkaSettings, TopicSettings
from i2v_fleet.schemas import JOB_EVENT_ADAPTER, PROGRESS_ADAPTER, JobRequest, SucceededEvent

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".i2v" / "demo"
console = Console(highlight=False)


def start_worker() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    OUT.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "NODE_ID": "demo-node",
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(port),
        "WORK_DIR": str(OUT / "work"),
    }
    log = open(OUT / "worker.log", "wb")  # noqa: SIM115 - the worker writes to it after we return
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "i2v"), "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    with console.status("starting the worker (loading the model) ..."):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                sys.exit(f"the worker exited; see {OUT / 'worker.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    console.print(
                        f"worker ready (ops: http://127.0.0.1:{port}/info, "
                        f"log: {OUT / 'worker.log'})"
                    )
                    return worker, port
            except OSError:
                time.sleep(0.5)
    sys.exit("the worker did not become ready in 5 minutes")


async def submit_and_follow(photo: bytes) -> SucceededEvent | None:
    kafka, topics = KafkaSettings(), TopicSettings().names()
    job = JobRequest(
        job_id=uuid.uuid4(),
        prompt="She looks up from her desk and smiles, soft light, slow push-in",
        image={"base64": base64.b64encode(photo).decode()},
        quality_preset="fast",
        image_size="480*832",
        num_frames=9,
        seed=2024,
        metadata={"source": "demo"},
    )
    follower = AIOKafkaConsumer(
        topics.status, topics.progress, **kafka.client_kwargs(), auto_offset_reset="latest"
    )
    await follower.start()
    await follower.seek_to_end()
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topics.requests, job.model_dump_json().encode(), key=job.key
        )
    finally:
        await producer.stop()
    console.print(
        f"submitted job {job.job_id} ({job.image_size}, {job.num_frames} frames, "
        f"preset {job.quality_preset.value}) to {topics.requests}[{sent.partition}]"
    )
    columns = (
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("queued", total=100, detail="")
            while True:
                batch = await follower.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        if record.key != job.key:
                            continue
                        if record.topic == topics.progress:
                            p = PROGRESS_ADAPTER.validate_json(record.value)
                            bar.update(
                                task,
                                description=p.phase.value,
                                completed=p.percent,
                                detail=f"{p.step}/{p.total_steps}",
                            )
                            continue
                        event = JOB_EVENT_ADAPTER.validate_json(record.value)
                        if event.type == "started":
                            bar.update(task, description="started", detail=event.node_id)
                        elif isinstance(event, SucceededEvent):
                            bar.update(task, completed=100, description="succeeded", detail="")
                            return event
                        elif event.type in {"failed", "cancelled"}:
                            console.print(
                                f"[red]job {event.type}:[/] {getattr(event, 'error', '')}"
                            )
                            return None
    finally:
        await follower.stop()


def main() -> None:
    photo = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples/images/grace_hopper.jpg"
    worker, _ = start_worker()
    try:
        event = asyncio.run(submit_and_follow(photo.read_bytes()))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    if event is None:
        sys.exit(1)
    result = event.result
    video = OUT / f"{event.job_id}.mp4"
    with urllib.request.urlopen(result.url, timeout=30) as response:
        video.write_bytes(response.read())
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    console.print(
        f"saved {video} ({result.width}x{result.height}, {result.num_frames} frames at "
        f"{result.fps} fps, {result.size_bytes} bytes)\n  timings: {timings}\n"
        f"  presigned URL (valid until {result.url_expires_at:%Y-%m-%d %H:%M} UTC):\n"
        f"  {result.url}"
    )
    console.print(
        "\nThe tiny model has random weights, so the video shows no real picture. For a real "
        "one, run ./scripts/demo again with MODEL_CKPT_DIR set to a download of "
        "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers; set KAFKA_BOOTSTRAP_SERVERS (and MINIO_ENDPOINT, "
        "MINIO_ACCESS_KEY, MINIO_SECRET_KEY, MINIO_BUCKET) to use your own Kafka and MinIO "
        "instead of the local stack. Stop the local stack with `.venv/bin/i2v dev down`."
    )


if __name__ == "__main__":
    main()
