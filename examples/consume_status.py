"""A service that only needs results: read i2v.status in its own consumer group.

Every value is a JobEvent keyed by job id; the first succeeded/failed/cancelled per job is
its outcome. Run: KAFKA_BOOTSTRAP_SERVERS=... python examples/consume_status.py
"""

from __future__ import annotations

import asyncio
import os

from aiokafka import AIOKafkaConsumer

from i2v_fleet.schemas import JOB_EVENT_ADAPTER, FailedEvent, SucceededEvent


async def main() -> None:
    consumer = AIOKafkaConsumer(
        os.environ.get("I2V_TOPIC_STATUS", "i2v.status"),
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        group_id="my-results-service",
        enable_auto_commit=True,
    )
    await consumer.start()
    try:
        async for record in consumer:
            if dict(record.headers).get("i2v-event-type") not in {
                b"succeeded",
                b"failed",
                b"cancelled",
            }:
                continue  # skip started/heartbeat/requeued without parsing them
            event = JOB_EVENT_ADAPTER.validate_json(record.value)
            if isinstance(event, SucceededEvent):
                print(event.job_id, "video at", event.result.url)
            elif isinstance(event, FailedEvent):
                print(event.job_id, "failed:", event.error.code, event.error.message)
            else:
                print(event.job_id, "cancelled")
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
