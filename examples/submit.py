"""An upstream asyncio service submitting a job and following it to its video.

Run: KAFKA_BOOTSTRAP_SERVERS=... python examples/submit.py photo.jpg "she smiles"
"""

from __future__ import annotations

import asyncio
import sys

from i2v_fleet.producer_sdk import AsyncClient, JobFailed
from i2v_fleet.schemas import ProgressEvent


async def main(photo: str, prompt: str) -> None:
    async with AsyncClient() as client:
        job = await client.submit(photo, prompt=prompt, quality_preset="fast", num_frames=41)
        print("submitted", job.job_id)
        async for event in client.watch(job.job_id):
            if isinstance(event, ProgressEvent):
                print(f"  {event.phase.value:<16} {event.percent:5.1f}%")
        try:
            print("video:", (await client.wait(job.job_id)).url)
        except JobFailed as failed:
            print("failed:", failed.code, failed.reason)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
