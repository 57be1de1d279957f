"""The client against the in-memory transport and fake worker: what users' own tests do."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from i2v_fleet.producer_sdk import AsyncClient, I2VError, InvalidJob, JobFailed
from i2v_fleet.producer_sdk.testing import FakeWorker, MemoryTransport, Outcome
from i2v_fleet.schemas import ErrorInfo, ProgressEvent

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"


async def test_the_readme_example_runs_against_the_fakes() -> None:
    """Submit a local photo, watch progress, and wait for the (fake) video."""
    transport = MemoryTransport()
    async with AsyncClient(transport=transport) as client, FakeWorker(transport) as worker:
        job = await client.submit(PHOTO, prompt="she smiles", quality_preset="fast")
        phases = [
            e.phase
            for e in [x async for x in client.watch(job.job_id)]
            if isinstance(e, ProgressEvent)
        ]
        result = await client.wait(job.job_id)
    assert phases == ["denoising"] * 4
    assert result.key == f"jobs/{job.job_id}/video.mp4"
    assert worker.handled[0].image.model_dump()["base64"]  # the photo went inline


async def test_wait_raises_the_jobs_error() -> None:
    """A failed job raises JobFailed carrying the contract's code and message."""
    transport = MemoryTransport()
    fail = Outcome(fail_with=ErrorInfo(code="out_of_memory", message="too big", retryable=True))
    async with AsyncClient(transport=transport) as client, FakeWorker(transport, outcome=fail):
        job = await client.submit("https://images.example.com/a.jpg", prompt="p")
        with pytest.raises(JobFailed) as info:
            await client.wait(job.job_id, timeout=10)
    assert (info.value.code, info.value.retryable) == ("out_of_memory", True)


async def test_invalid_jobs_are_refused_before_publishing() -> None:
    """A bad field raises InvalidJob naming it, and nothing reaches the broker."""
    transport = MemoryTransport()
    async with AsyncClient(transport=transport) as client:
        with pytest.raises(InvalidJob, match="num_frames"):
            await client.submit("https://a.io/x.jpg", prompt="p", num_frames=80)
        with pytest.raises(InvalidJob, match="not a file"):
            await client.submit("/no/such/file.jpg", prompt="p")
    assert not transport.log


async def test_resubmitting_a_job_id_keeps_it() -> None:
    """A caller-given job_id is the idempotency key: the same id lands on the same partition."""
    transport = MemoryTransport()
    job_id = uuid.uuid4()
    async with AsyncClient(transport=transport) as client:
        first = await client.submit("https://a.io/x.jpg", prompt="p", job_id=job_id)
        again = await client.submit("https://a.io/x.jpg", prompt="p", job_id=job_id)
    assert (
        (first.job_id, first.partition)
        == (again.job_id, again.partition)
        == (
            job_id,
            first.partition,
        )
    )


async def test_a_closed_client_says_so() -> None:
    """Using a client outside its `async with` block is an error that says what to do."""
    client = AsyncClient(transport=MemoryTransport())
    with pytest.raises(I2VError, match="async with"):
        await client.submit("https://a.io/x.jpg", prompt="p")
