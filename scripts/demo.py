"""Publish one job to the local stack and read it back as a worker would claim it.

Run through `scripts/demo`, which starts the stack and exports its address first.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producer_sdk import KafkaSettings, TopicSettings
from schemas import JOB_REQUEST_ADAPTER, WORKERS_GROUP, JobRequest


async def main() -> None:
    kafka, topics = KafkaSettings(), TopicSettings().names()
    request = JobRequest(
        job_id=uuid.uuid4(),
        prompt="A paper boat drifts down a rain-soaked street, reflections shimmering",
        image={"url": "https://images.example.com/boat.jpg"},
        quality_preset="fast",
        image_size="832*480",
        num_frames=41,
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
                break
    finally:
        await consumer.stop()
    sampling = claimed.sampling()
    print(
        f"claimed  {claimed.job_id} in group {WORKERS_GROUP}: {claimed.image_size} x "
        f"{claimed.num_frames} frames, {sampling.infer_steps} steps, cfg "
        f"{sampling.guidance_scale}, {sampling.sample_solver}"
    )


if __name__ == "__main__":
    asyncio.run(main())
