"""Submit one job to the local stack, claim it as a worker does, and render it to MP4.

Run through `scripts/demo`, which starts the stack, writes the tiny model and exports the
settings first. The rendering uses the same mapping and engine as a worker node.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.generation import generation_request
from pipeline import Generated, WanI2V, encode_mp4, prepare_image, write_poster
from producer_sdk import KafkaSettings, TopicSettings
from schemas import JOB_REQUEST_ADAPTER, WORKERS_GROUP, Base64Image, JobRequest

ROOT = Path(__file__).resolve().parents[1]


async def submit_and_claim(image: bytes) -> JobRequest:
    kafka, topics = KafkaSettings(), TopicSettings().names()
    request = JobRequest(
        job_id=uuid.uuid4(),
        prompt="She looks up from her desk and smiles, soft light, slow push-in",
        image={"base64": base64.b64encode(image).decode()},
        quality_preset="fast",
        image_size="480*832",
        num_frames=5,
        seed=2024,
    )
    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topics.requests, request.model_dump_json().encode(), key=request.key
        )
    finally:
        await producer.stop()
    print(f"submitted {request.job_id} to {topics.requests}[{sent.partition}]@{sent.offset}")

    consumer = AIOKafkaConsumer(
        topics.requests,
        **kafka.client_kwargs(),
        group_id=WORKERS_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while True:
            record = await asyncio.wait_for(consumer.getone(), timeout=60)
            claimed = JOB_REQUEST_ADAPTER.validate_json(record.value)
            await consumer.commit()
            if claimed.job_id == request.job_id:
                print(f"claimed   {claimed.job_id} in group {WORKERS_GROUP}")
                return claimed
    finally:
        await consumer.stop()


def render(job: JobRequest, model_dir: Path, out_dir: Path) -> Path:
    assert isinstance(job.image, Base64Image)
    image = prepare_image(job.image.decode(), job.image_size.width, job.image_size.height)
    engine = WanI2V.load(model_dir)

    def on_progress(phase: str, step: int, total: int) -> None:
        print(f"\r  {phase:<16} {step}/{total}   ", end="", flush=True)

    outcome = engine.generate(generation_request(job, image), on_progress=on_progress)
    print()
    assert isinstance(outcome, Generated)
    out_dir.mkdir(parents=True, exist_ok=True)
    video = out_dir / f"{job.job_id}.mp4"
    info = encode_mp4(outcome.frames, video, fps=job.fps)
    write_poster(outcome.frames[0], video.with_suffix(".jpg"))
    print(
        f"rendered  {video} ({info.width}x{info.height}, {info.num_frames} frames at "
        f"{info.fps} fps, {info.size_bytes} bytes) and its poster; the tiny model's weights "
        "are random, so the video shows no real picture: point MODEL_CKPT_DIR at the real "
        "model for a real video"
    )
    return video


def main() -> None:
    model_dir = Path(os.environ["MODEL_CKPT_DIR"])
    image = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples/images/grace_hopper.jpg"
    job = asyncio.run(submit_and_claim(image.read_bytes()))
    render(job, model_dir, ROOT / ".i2v" / "demo")


if __name__ == "__main__":
    main()
