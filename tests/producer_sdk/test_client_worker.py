"""The client against a real worker on the local stack, with the tiny model."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline import probe_mp4
from producer_sdk import (
    AsyncClient,
    JobCancelled,
    JobFailed,
    KafkaTransport,
    WaitTimeout,
    partition_for,
)
from schemas import ProgressEvent, TopicNames

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow]

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
CHEAP = {
    "image_size": "480*832",
    "num_frames": 5,
    "quality_preset": "custom",
    "infer_steps": 2,
    "guidance_scale": 2.0,
    "seed": 3,
}


async def test_submit_watch_and_download(
    worker: Any, cluster: Any, worker_topics: TopicNames, tmp_path: Path
) -> None:
    """Submit a photo, watch phases in order to one final event, and decode the MP4."""
    transport = KafkaTransport(cluster.kafka)
    async with AsyncClient(topics=worker_topics, transport=transport) as client:
        job = await client.submit(PHOTO, prompt="she smiles", **CHEAP)
        events = [e async for e in client.watch(job.job_id)]
        key = str(job.job_id).encode()
        assert transport.last_assignment == {
            (worker_topics.status, partition_for(key, 2)),
            (worker_topics.progress, partition_for(key, 2)),
        }
        finals = [
            e for e in events if getattr(e, "type", "") in {"succeeded", "failed", "cancelled"}
        ]
        assert [e.type for e in finals] == ["succeeded"]
        order = [
            "loading_inputs",
            "encoding_prompt",
            "denoising",
            "decoding",
            "encoding_video",
            "uploading",
        ]
        seen = [e.phase.value for e in events if isinstance(e, ProgressEvent)]
        assert [p for p in order if p in seen] == sorted(set(seen), key=order.index)
        assert seen == sorted(seen, key=order.index)

        result = await client.wait(job.job_id, timeout=30)
        video = tmp_path / "v.mp4"
        data = await asyncio.to_thread(lambda: urllib.request.urlopen(result.url).read())
        video.write_bytes(data)
        assert probe_mp4(video).num_frames == 5

        replay = [e async for e in client.watch(job.job_id)]
        assert [getattr(e, "type", None) for e in replay] == [
            getattr(e, "type", None) for e in events
        ]


async def test_wait_raises_for_failed_cancelled_and_timed_out_jobs(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """wait() raises JobFailed, JobCancelled or WaitTimeout as the job's fate says."""
    async with AsyncClient(kafka=cluster.kafka, topics=worker_topics) as client:
        failing = await client.submit("http://127.0.0.1:9/x.png", prompt="p", **CHEAP)
        with pytest.raises(JobFailed) as failed:
            await client.wait(failing.job_id, timeout=60)
        assert failed.value.code == "image_fetch_failed"

        import uuid

        queued_id = uuid.uuid4()
        await client.cancel(queued_id, reason="not needed")
        await asyncio.sleep(1)
        await client.submit(PHOTO, prompt="p", job_id=queued_id, **CHEAP)
        with pytest.raises(JobCancelled) as cancelled:
            await client.wait(queued_id, timeout=60)
        assert cancelled.value.reason == "not needed"

        slow = await client.submit(PHOTO, prompt="p", **{**CHEAP, "infer_steps": 30})
        with pytest.raises(WaitTimeout):
            await client.wait(slow.job_id, timeout=0.5)
        await client.cancel(slow.job_id)
        with pytest.raises(JobCancelled):
            await client.wait(slow.job_id, timeout=90)
