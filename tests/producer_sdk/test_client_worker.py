"""The client against a real worker on the local stack (its stand-in engine: a real MP4 after
the engine's phases; the tiny model's own run is test_worker.py's)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from i2v_fleet.pipeline import probe_mp4
from i2v_fleet.producer_sdk import (
    AsyncClient,
    JobCancelled,
    JobFailed,
    KafkaTransport,
    WaitTimeout,
    partition_for,
)
from i2v_fleet.schemas import EventType, ProgressEvent, TopicNames
from tests.conftest import Cluster, run_worker

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


@pytest.fixture(scope="module")
def worker(
    cluster: Cluster,
    worker_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """`i2v worker` in its own process with the stand-in engine (0.2 s a step)."""
    env = {"STANDIN_ENGINE": "pace:0.2", "I2V_TEST_TOOLS": "true"}
    yield from run_worker(cluster, worker_topics, tiny_model_dir, tmp_path_factory, env)


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
            e
            for e in events
            if not isinstance(e, ProgressEvent) and EventType(e.type).is_terminal()
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


def _cli_env(cluster: Any, topics: TopicNames) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": cluster.kafka.bootstrap_servers,
        **{f"I2V_TOPIC_{role.upper()}": name for role, name in topics},
    }


def test_cli_submit_watch_in_a_terminal_shows_a_progress_bar(
    worker: Any, cluster: Any, worker_topics: TopicNames, tmp_path: Path
) -> None:
    """`i2v submit --watch` in a pseudo-terminal draws a progress bar and exits 0."""
    import os
    import pty
    import subprocess
    import sys

    primary, secondary = pty.openpty()
    env = {**os.environ, **_cli_env(cluster, worker_topics), "COLUMNS": "120", "TERM": "xterm"}
    download = tmp_path / "cli.mp4"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "i2v"),
            "submit",
            str(PHOTO),
            "-p",
            "she smiles",
            "--preset",
            "custom",
            "--steps",
            "2",
            "--guidance",
            "2",
            "--size",
            "480*832",
            "--frames",
            "5",
            "--watch",
            "--download",
            str(download),
        ],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        close_fds=True,
    )
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.wait(120) == 0, screen.decode(errors="replace")[-2000:]
    text = screen.decode(errors="replace")
    assert "━" in text  # the bar itself
    assert "denoising" in text
    assert "succeeded" in text
    assert "X-Amz-Signature" in text  # the result URL is printed at the end
    assert probe_mp4(download).num_frames == 5


def test_cli_exit_codes_and_json(worker: Any, cluster: Any, worker_topics: TopicNames) -> None:
    """Scripts can tell failure (1), bad input (2) and cancel (3) apart, and read --json."""
    from typer.testing import CliRunner

    from i2v_fleet.producer_sdk.cli import app

    runner, env = CliRunner(), _cli_env(cluster, worker_topics)
    failed = runner.invoke(
        app,
        ["submit", "http://127.0.0.1:9/x.png", "-p", "p", "--wait", "--preset", "fast"],
        env=env,
    )
    assert failed.exit_code == 1, failed.output
    assert "image_fetch_failed" in failed.stderr
    invalid = runner.invoke(app, ["submit", str(PHOTO), "-p", "p", "--frames", "80"], env=env)
    assert invalid.exit_code == 2
    assert "num_frames" in invalid.stderr

    submitted = runner.invoke(
        app,
        [
            "submit",
            str(PHOTO),
            "-p",
            "p",
            "--preset",
            "custom",
            "--steps",
            "60",
            "--guidance",
            "2",
            "--size",
            "480*832",
            "--frames",
            "5",
            "--json",
        ],
        env=env,
    )
    assert submitted.exit_code == 0, submitted.output
    from pydantic import TypeAdapter

    job_id = TypeAdapter(dict[str, Any]).validate_json(submitted.stdout)["job_id"]
    assert runner.invoke(app, ["cancel", job_id, "--reason", "test"], env=env).exit_code == 0
    watched = runner.invoke(app, ["watch", job_id, "--json"], env=env)
    assert watched.exit_code == 3, watched.output
    assert '"type":"cancelled"' in watched.stdout
    status = runner.invoke(app, ["status", job_id, "--json"], env=env)
    assert TypeAdapter(dict[str, Any]).validate_json(status.stdout)["state"] == "cancelled"

    nodes = runner.invoke(app, ["nodes", "--json"], env=env)
    assert nodes.exit_code == 0
    assert '"node_id":"test-node-1"' in nodes.stdout
    queue = runner.invoke(app, ["queue", "--json", "--group", worker.group], env=env)
    assert queue.exit_code == 0, queue.output
    assert TypeAdapter(dict[str, Any]).validate_json(queue.stdout)["total"] == 0


def test_the_sync_client_follows_a_job(
    worker: Any, cluster: Any, worker_topics: TopicNames
) -> None:
    """Client (no event loop needed) submits, watches and waits like AsyncClient."""
    from i2v_fleet.producer_sdk import Client

    with Client(kafka=cluster.kafka, topics=worker_topics) as client:
        job = client.submit(PHOTO, prompt="p", **CHEAP)
        types = [getattr(e, "type", "progress") for e in client.watch(job.job_id)]
        assert types[-1] == "succeeded"
        assert client.wait(job.job_id, timeout=10).num_frames == 5
        assert client.status(job.job_id).state.value == "succeeded"


async def test_a_large_local_image_goes_through_the_object_store(
    worker: Any, cluster: Any, worker_topics: TopicNames, tmp_path: Path
) -> None:
    """Over the inline cap, a client with an object store uploads and sends an s3 reference."""
    import numpy as np
    from PIL import Image

    from i2v_fleet.producer_sdk import InvalidJob

    big = tmp_path / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big)
    assert big.stat().st_size > 1024 * 1024

    async with AsyncClient(kafka=cluster.kafka, topics=worker_topics) as plain:
        with pytest.raises(InvalidJob, match="object_store"):
            await plain.submit(big, prompt="p", **CHEAP)
    async with AsyncClient(
        kafka=cluster.kafka, topics=worker_topics, object_store=cluster.s3
    ) as client:
        job = await client.submit(big, prompt="p", **CHEAP)
        assert job.request.image.model_dump()["s3"]["key"] == f"uploads/{job.job_id}/noise.png"
        result = await client.wait(job.job_id, timeout=90)
    assert result.num_frames == 5
