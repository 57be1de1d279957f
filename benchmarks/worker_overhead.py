"""A worker's per-job cost outside the model, for a 1280x720, 81-frame video, on this CPU.

Run: `.venv/bin/python benchmarks/worker_overhead.py [--out FILE]`.
It times what the node does around the engine, each against the real local stack: fetching
the image over HTTP through the SSRF-safe fetcher, preparing it, encoding 81 frames to
H.264 plus the poster, uploading the result to S3 (moto), and writing the job's events to
Kafka (Tansu). The model itself is measured by engine_cpu.py and dit_gpu.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image

from i2v_fleet.consumer.events import Emitter
from i2v_fleet.consumer.fetch import FetchPolicy, fetch_image
from i2v_fleet.consumer.storage import ResultStore, StoreConfig
from i2v_fleet.pipeline import encode_mp4, prepare_image, write_poster
from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig, free_port
from i2v_fleet.schemas import ErrorInfo, JobRequest, Phase, TopicNames, topic_specs

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "grace_hopper.jpg"
WIDTH, HEIGHT, FRAMES = 1280, 720, 81


def frames() -> np.ndarray:
    """81 frames of a slowly moving photo: compresses like real footage, unlike noise."""
    base = np.asarray(prepare_image(PHOTO.read_bytes(), WIDTH + 160, HEIGHT))
    return np.stack([base[:, i * 2 : i * 2 + WIDTH] for i in range(FRAMES)])


async def serve_photo(data: bytes) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/photo.jpg", lambda _: web.Response(body=data, content_type="image/jpeg"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def measure(stack: DevStack, repeats: int) -> dict[str, float]:
    from aiokafka import AIOKafkaProducer

    from i2v_fleet.producer_sdk.admin import create_topics

    c = stack.config
    # A 1920x1080 JPEG, as a phone or a CMS would send.
    big = io.BytesIO()
    Image.open(PHOTO).convert("RGB").resize((1920, 1080)).save(big, "JPEG", quality=92)
    runner, port = await serve_photo(big.getvalue())
    policy = FetchPolicy.from_env_value("127.0.0.1")
    store = ResultStore(
        StoreConfig(
            endpoint=c.s3_endpoint,
            access_key=c.access_key,
            secret_key=c.secret_key,
            bucket=c.bucket,
        )
    )
    topics = TopicNames().with_suffix(f".bench{uuid.uuid4().hex[:6]}")
    from i2v_fleet.producer_sdk.settings import KafkaSettings

    await create_topics(KafkaSettings(bootstrap_servers=c.bootstrap_servers), topic_specs(topics))
    producer = AIOKafkaProducer(bootstrap_servers=c.bootstrap_servers, acks="all")
    await producer.start()
    emitter = Emitter(producer, topics, "bench-node", interval_s=0.5)
    video_frames = await asyncio.to_thread(frames)
    best: dict[str, float] = {}
    try:
        for _ in range(repeats):
            t: dict[str, float] = {}
            job = JobRequest(
                job_id=uuid.uuid4(), prompt="p", image={"url": f"http://127.0.0.1:{port}/photo.jpg"}
            )
            t0 = time.perf_counter()
            data = await fetch_image(f"http://127.0.0.1:{port}/photo.jpg", policy)
            t["fetch (1920x1080 JPEG over HTTP)"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.to_thread(prepare_image, data, WIDTH, HEIGHT)
            t["prepare image (decode, crop, resize)"] = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                video = Path(tmp) / "video.mp4"
                t0 = time.perf_counter()
                info = await asyncio.to_thread(encode_mp4, video_frames, video, 16)
                poster = io.BytesIO()
                await asyncio.to_thread(write_poster, video_frames[0], poster)
                t["encode MP4 + poster (81 frames)"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                await store.put_result(
                    job.job_id,
                    video,
                    poster.getvalue(),
                    {"bench": True},
                    width=WIDTH,
                    height=HEIGHT,
                    num_frames=FRAMES,
                    fps=16,
                    timings={},
                )
                t["upload video + poster + meta"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            await emitter.started(job, 60)
            for step in range(31):  # a balanced job: 30 steps, every one sent
                emitter._last_progress.clear()
                await emitter.progress(job, Phase.DENOISING, step, 30)
            await emitter.failed(job, ErrorInfo(code="internal", message="bench"))
            t["events (started, 31 progress, final)"] = time.perf_counter() - t0
            t["mp4 size MB"] = info.size_bytes / 1e6
            best = {k: min(v, best.get(k, v)) for k, v in t.items()}
    finally:
        await producer.stop()
        await runner.cleanup()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        stack = DevStack(
            StackConfig(
                state_dir=Path(state), kafka_port=free_port(), s3_port=free_port(), bucket="bench"
            )
        )
        stack.up()
        try:
            best = asyncio.run(measure(stack, args.repeats))
        finally:
            stack.down()
    overhead = sum(v for k, v in best.items() if not k.startswith("mp4"))
    lines = [
        f"# worker overhead outside the model: {WIDTH}x{HEIGHT}, {FRAMES} frames "
        f"(min of {args.repeats})"
    ]
    lines += [f"{k:<40} {v:8.2f} {'MB' if k.startswith('mp4') else 's'}" for k, v in best.items()]
    lines.append(f"{'total outside the model':<40} {overhead:8.2f} s")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
