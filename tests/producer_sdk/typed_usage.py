"""How an upstream service uses the SDK, checked by mypy --strict (scripts/test runs it).

Not a test module: nothing here runs; it fails CI when the public API's types change.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID

from i2v_fleet.producer_sdk import (
    AsyncClient,
    Client,
    I2VError,
    JobCancelled,
    JobFailed,
    JobHandle,
    JobStatus,
    QueueDepth,
    WaitTimeout,
)
from i2v_fleet.schemas import JobResult, JobState, NodeInfo, ProgressEvent


async def submit_and_wait(photo: Path) -> str | None:
    async with AsyncClient() as client:
        job: JobHandle = await client.submit(photo, prompt="a cat yawns", quality_preset="fast")
        job_id: UUID = job.job_id
        async for event in client.watch(job_id):
            if isinstance(event, ProgressEvent):
                percent: float = event.percent
                assert percent >= 0
        try:
            result: JobResult = await client.wait(job_id, timeout=600)
        except JobFailed as failed:
            code: str = failed.code
            return code
        except (JobCancelled, WaitTimeout):
            return None
        status: JobStatus = await client.status(job_id, lookback=timedelta(hours=1))
        assert status.state is JobState.SUCCEEDED
        depth: QueueDepth = await client.queue()
        nodes: list[NodeInfo] = await client.nodes()
        assert depth.total >= 0
        assert isinstance(nodes, list)
        return result.url


def sync_usage(url: str) -> int:
    try:
        with Client() as client:
            job = client.submit(url, prompt="waves crash", num_frames=41, seed=7)
            client.cancel(job.job_id, reason="changed my mind")
            return client.wait(job.job_id).num_frames
    except I2VError:
        return 0
