"""The node's behaviour in-process: the real supervisor, admission, job run and hand-back over
Kafka in memory, a stand-in engine per failure mode, and the real local S3 server.

The subprocess suites (test_worker.py, tests/fleet) keep proving the same node against the
real broker and the tiny model; these cover every scenario in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from pydantic import TypeAdapter

from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.producer_sdk.cli.monitor import Alerts, NodeTrack, memory_pct, poll
from i2v_fleet.producer_sdk.settings import ObjectStoreSettings
from i2v_fleet.schemas import JobRequest, SucceededEvent
from tests.fleet.harness import cheap_job

from .inprocess import (
    cancel,
    dead_letters,
    final,
    lifecycle,
    node_infos,
    node_settings,
    progress,
    running_node,
    status,
    submit,
    until,
)
from .memory_kafka import MemoryBroker

pytestmark = [pytest.mark.minio]

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
AS_JSON = TypeAdapter(dict[str, Any]).validate_json


def _job(**fields: Any) -> JobRequest:
    """The smallest job (the fleet suite's), tagged as this suite's."""
    return cheap_job(**{"metadata": {"suite": "node"}, **fields})


def _denoising(broker: MemoryBroker, job: JobRequest) -> bool:
    return any(p.phase == "denoising" for p in progress(broker, job.job_id))


@pytest.fixture
def settings(s3: ObjectStoreSettings, tmp_path: Path) -> Any:
    """Settings for a node with the stand-in engine `engine` (sleep:0.2 by default)."""

    def make(engine: str = "sleep:0.2", **fields: Any) -> WorkerSettings:
        return node_settings(
            s3, tmp_path / "work", standin_engine=engine, i2v_test_tools=True, **fields
        )

    return make


async def test_a_job_becomes_a_stored_video_with_its_events(settings: Any, s3: Any) -> None:
    """started, progress through every phase, succeeded with a downloadable MP4 and meta.json;
    seq counts up from 0 and every event carries the job's metadata and the node's id."""
    async with running_node(settings()) as node:
        job = _job()
        await submit(node.broker, job)
        done = await final(node.broker, job.job_id)
    events = status(node.broker, job.job_id)
    assert next(e.type for e in events) == "started"
    assert isinstance(done, SucceededEvent)
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(e.metadata == {"suite": "node"} for e in events)
    assert {e.node_id for e in events} == {node.supervisor.settings.node_id}
    video = await asyncio.to_thread(lambda: urllib.request.urlopen(done.result.url).read())
    assert len(video) == done.result.size_bytes
    assert (done.result.width, done.result.height, done.result.num_frames) == (480, 832, 5)
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=False)
    meta = AS_JSON(client.get_object(s3.bucket, f"jobs/{job.job_id}/meta.json").read())
    assert meta["parameters"]["seed"] == 1
    assert meta["request"]["image"] == {"base64_bytes": PHOTO.stat().st_size}
    phases = [p.phase for p in progress(node.broker, job.job_id)]
    assert phases[0] == "loading_inputs"
    assert phases[-1] == "uploading"
    assert progress(node.broker, job.job_id)[-1].percent == 100.0
    assert node.supervisor.stats.outcomes == {"succeeded": 1}


async def test_no_hostile_record_stops_its_partition(settings: Any) -> None:
    """Every kind of record that once wedged a partition sits in front of a valid job in the
    same partition: each is answered (failed/invalid_request when its id is readable) or
    dead-lettered, and the valid job behind them all succeeds."""
    ids = [uuid.uuid4() for _ in range(8)]
    base = _job().model_dump(mode="json")

    def job(i: int, **fields: Any) -> bytes:
        return json.dumps({**base, "job_id": str(ids[i]), **fields}).encode()

    # (record, its job id when readable, whether a DLQ copy is expected)
    hostile: list[tuple[bytes, uuid.UUID | None, bool]] = [
        (b"\x00not json at all", None, True),
        (b'{"job_id": "3f2b8c1e\\u0001", "prompt": "x"}', None, True),
        (f'{{"job_id": "{ids[0]}", "a\\u0000b": 1}}'.encode(), ids[0], False),
        (job(1, **{"n" * 5000: 1}), ids[1], False),
        (job(2, metadata={"k" * 5000: "v"}), ids[2], True),
        (job(3, attempt=0), ids[3], True),
        (job(4, attempt=2**70), ids[4], True),
        (job(5, metadata=["a"]), ids[5], True),
        (b'{"prompt": "\\u0007", "\\u0001": 2}', None, True),
        (job(6, image={"s3": {"bucket": "i2v-in", "key": "a/../b.png"}}), ids[6], False),
        (job(7, num_frames=80), ids[7], False),
    ]
    async with running_node(settings()) as node:
        for value, job_id, _ in hostile:
            key = str(job_id).encode() if job_id else b"hostile"
            await submit(node.broker, value, key, partition=0)
        good = _job()
        await submit(node.broker, good, partition=0)
        assert (await final(node.broker, good.job_id)).type == "succeeded"
    for job_id in ids:
        assert [e.type for e in status(node.broker, job_id)] == ["failed"], job_id
        event = status(node.broker, job_id)[0]
        assert (event.error.code, event.attempt) == ("invalid_request", 1)
    assert "num_frames" in status(node.broker, ids[7])[0].error.message
    dead = [r.value for r in dead_letters(node.broker)]
    assert {value for value, _, copied in hostile if copied} == set(dead)
    assert dict(dead_letters(node.broker)[0].headers)["i2v-error-code"] == b"invalid_request"
    assert node.engine.jobs == 1  # nothing but the valid job reached the engine


async def test_cancel_while_queued_and_ttl_expiry_cost_no_compute(settings: Any) -> None:
    """A job cancelled before it is claimed ends cancelled; one past its ttl ends expired;
    neither reaches the engine."""
    broker = MemoryBroker()
    cancelled = _job()
    await cancel(broker, cancelled, "changed my mind")
    await submit(broker, cancelled)
    stale = _job(ttl_s=1, submitted_at="2020-01-01T00:00:00Z")
    await submit(broker, stale)
    async with running_node(settings(), broker) as node:
        assert (await final(broker, cancelled.job_id)).reason == "changed my mind"
        expired = await final(broker, stale.job_id)
    assert lifecycle(broker, cancelled.job_id) == [("cancelled", 1)]
    assert (expired.type, expired.error.code) == ("failed", "expired")
    assert node.engine.jobs == 0


async def test_cancel_and_timeout_stop_a_running_job(settings: Any) -> None:
    """A running job stops at its next step on cancel (cancelled, with the reason) or past
    timeout_s (failed/timeout naming the limit), and the node runs the next job."""
    async with running_node(settings("sleep:30")) as node:
        running = _job()
        await submit(node.broker, running)
        await until(
            lambda: any(p.phase == "denoising" for p in progress(node.broker, running.job_id))
        )
        await cancel(node.broker, running, "stop it")
        stopped = await final(node.broker, running.job_id)
        assert (stopped.type, stopped.reason) == ("cancelled", "stop it")

        slow = _job(timeout_s=1)
        await submit(node.broker, slow)
        late = await final(node.broker, slow.job_id)
    assert (late.type, late.error.code) == ("failed", "timeout")
    assert "timeout_s=1" in late.error.message


@pytest.mark.parametrize(
    ("engine", "message"),
    [("die,sleep:0.1", "exited"), ("stall:0.5,sleep:0.1", "sent nothing for")],
)
async def test_an_engine_lost_mid_job_is_restarted_and_the_job_retried(
    settings: Any, engine: str, message: str
) -> None:
    """An engine that dies or stalls mid-job: the attempt is handed back (requeued,
    engine_failure, retryable), the engine restarted, and attempt 2 succeeds."""
    async with running_node(settings(engine)) as node:
        job = _job()
        await submit(node.broker, job)
        await until(lambda: ("succeeded", 2) in lifecycle(node.broker, job.job_id))
    assert lifecycle(node.broker, job.job_id) == [
        ("started", 1),
        ("requeued", 1),
        ("started", 2),
        ("succeeded", 2),
    ]
    requeued = next(e for e in status(node.broker, job.job_id) if e.type == "requeued")
    assert (requeued.reason, requeued.error.retryable) == ("engine_failure", True)
    assert message in requeued.error.message
    assert node.engine.restarts == 1
    assert node.supervisor.metrics.engine_restarts._value.get() == 1


async def test_attempts_run_out_into_the_dlq_and_worker_lost(settings: Any) -> None:
    """With MAX_ATTEMPTS=2, an engine that dies twice ends the job failed/worker_lost, and
    the request goes to the DLQ: the same hand-back policy as the reaper's."""
    async with running_node(settings("die", max_attempts=2)) as node:
        job = _job()
        await submit(node.broker, job)
        await until(lambda: ("failed", 2) in lifecycle(node.broker, job.job_id))
    assert lifecycle(node.broker, job.job_id) == [
        ("started", 1),
        ("requeued", 1),
        ("started", 2),
        ("failed", 2),
    ]
    failed = status(node.broker, job.job_id)[-1]
    assert failed.error.code == "worker_lost"
    assert "MAX_ATTEMPTS=2" in failed.error.message
    (dead,) = dead_letters(node.broker)
    assert JobRequest.model_validate_json(dead.value or b"").job_id == job.job_id


@pytest.mark.parametrize(
    ("engine", "code", "retryable"),
    [
        ("fail:out_of_memory", "out_of_memory", False),
        ("fail:internal/retryable", "internal", True),
        ("fail:image_invalid", "image_invalid", False),
    ],
)
async def test_an_engine_error_fails_the_job_with_its_code_and_retry_flag(
    settings: Any, engine: str, code: str, retryable: bool
) -> None:
    """What the engine reports reaches the client unchanged: the code and the retry flag."""
    async with running_node(settings(engine)) as node:
        job = _job()
        await submit(node.broker, job)
        failed = await final(node.broker, job.job_id)
    assert (failed.type, failed.error.code, failed.error.retryable) == ("failed", code, retryable)
    assert node.supervisor.stats.outcomes == {f"failed:{code}": 1}


async def test_shutdown_hands_a_running_job_back_after_the_grace(settings: Any) -> None:
    """stop() while a job runs: it gets SHUTDOWN_GRACE, then stops at its next step, is
    re-published as attempt 2 and marked requeued/shutdown; run() returns."""
    async with running_node(settings("sleep:60")) as node:
        job = _job()
        await submit(node.broker, job)
        await until(lambda: _denoising(node.broker, job))
        await node.stop()
    assert lifecycle(node.broker, job.job_id) == [("started", 1), ("requeued", 1)]
    assert status(node.broker, job.job_id)[-1].reason == "shutdown"
    again = [
        JobRequest.model_validate_json(r.value or b"")
        for r in node.broker.records(node.topics.requests)
    ]
    assert [(j.job_id, j.attempt) for j in again] == [(job.job_id, 1), (job.job_id, 2)]
    assert node_infos(node.broker, node.supervisor.settings.node_id)[-1].state == "stopped"


async def test_a_busy_node_hands_waiting_records_to_an_idle_one(
    settings: Any, tmp_path: Path
) -> None:
    """LEAVE_GROUP_WHILE_BUSY=auto: node A runs a long job with another waiting behind it in
    its partitions; once node B says it is idle, A leaves the group and B runs the waiting
    job while A's still runs."""
    broker = MemoryBroker(partitions=1)  # one partition: only A can hold it
    async with running_node(settings("sleep:30"), broker) as a:
        first = _job()
        await submit(broker, first)
        await until(lambda: lifecycle(broker, first.job_id) == [("started", 1)])
        behind = _job()
        await submit(broker, behind)  # waits behind `first` in A's partition
        async with running_node(settings("sleep:0.1"), broker) as b:
            done = await final(broker, behind.job_id, timeout=30)
            assert done.node_id == b.supervisor.settings.node_id
            assert lifecycle(broker, first.job_id) == [("started", 1)]  # still running on A
            assert a.supervisor.metrics.group_leaves._value.get() == 1


async def test_bad_images_fail_with_their_codes_and_reach_no_engine(settings: Any) -> None:
    """A GIF fails image_invalid naming it, a loopback URL fails image_fetch_failed naming
    ALLOWED_HOSTS (and never echoing a signature); the engine runs nothing."""
    gif = base64.b64encode(b"GIF89a" + b"\0" * 64).decode()
    not_an_image = _job(image={"base64": gif})
    private_url = _job(image={"url": "http://127.0.0.1:9/secret.png?X-Amz-Signature=abc"})
    async with running_node(settings(allowed_hosts="example.com")) as node:
        for job in (not_an_image, private_url):
            await submit(node.broker, job)
        invalid = await final(node.broker, not_an_image.job_id)
        fetch = await final(node.broker, private_url.job_id)
    assert (invalid.error.code, "GIF" in invalid.error.message) == ("image_invalid", True)
    assert fetch.error.code == "image_fetch_failed"
    assert "ALLOWED_HOSTS" in fetch.error.message
    assert "Signature" not in fetch.error.message
    assert node.engine.jobs == 0


async def test_an_s3_image_reference_is_read_from_the_nodes_store(
    settings: Any, s3: ObjectStoreSettings
) -> None:
    """A job whose image is an `s3` reference in the node's bucket runs; a missing key fails
    image_fetch_failed."""
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=False)
    key = f"uploads/{uuid.uuid4()}.jpg"
    await asyncio.to_thread(client.fput_object, s3.bucket, key, str(PHOTO))
    async with running_node(settings()) as node:
        job = _job(image={"s3": {"bucket": s3.bucket, "key": key}})
        missing = _job(image={"s3": {"bucket": s3.bucket, "key": "uploads/nope.jpg"}})
        await submit(node.broker, job)
        await submit(node.broker, missing)
        assert (await final(node.broker, job.job_id)).type == "succeeded"
        gone = await final(node.broker, missing.job_id)
    assert (gone.type, gone.error.code) == ("failed", "image_fetch_failed")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_ops_endpoints_and_node_info_with_memory(settings: Any) -> None:
    """/healthz, /readyz, /metrics and /info answer; NodeInfo carries the host's memory, so
    `i2v monitor --alert-on-high-memory` fires on what a real node sends."""
    async with running_node(settings(server_host="127.0.0.1", server_port=0)) as node:
        url = node.supervisor.ops_url
        assert url is not None
        assert (await asyncio.to_thread(_get, f"{url}/healthz"))[0] == 200
        code, body = await asyncio.to_thread(_get, f"{url}/readyz")
        assert code == 200, body
        assert all(AS_JSON(body)["checks"].values())
        code, body = await asyncio.to_thread(_get, f"{url}/metrics")
        for name in ("i2v_jobs_total", "i2v_group_leaves_total", "i2v_requeues_total"):
            assert name.encode() in body, name
        code, body = await asyncio.to_thread(_get, f"{url}/info")
        info = AS_JSON(body)
        assert (code, info["engine_alive"], info["requests_partitions"]) == (200, True, [0, 1])
        node_id = node.supervisor.settings.node_id
        await until(lambda: bool(node_infos(node.broker, node_id)))
        announced = node_infos(node.broker, node_id)[-1]
        assert announced.ops_url == url
        assert announced.memory is not None
        assert 0 < announced.memory.used_bytes <= announced.memory.total_bytes
        # What `i2v monitor` does with a node it found on i2v.nodes: poll it, then alert.
        sample = await poll(url, announced, timeout=5)
    assert sample["memory_pct"] == memory_pct(announced)
    assert 0 < sample["memory_pct"] <= 100
    alerts = Alerts(high_memory_pct=0.0)
    alerts.update(NodeTrack(url=url, node_id=node_id, info=announced), sample)
    assert [alert["kind"] for alert in alerts.open.values()] == ["high_memory"]


def test_a_stand_in_engine_is_refused_outside_tests() -> None:
    """STANDIN_ENGINE needs I2V_TEST_TOOLS=true, an unknown behaviour is named, and no preset
    or deploy file turns the test tools on."""
    from pydantic import ValidationError

    from i2v_fleet.consumer.presets import PRESETS, render

    with pytest.raises(ValidationError, match="I2V_TEST_TOOLS=true"):
        WorkerSettings(_env_file=None, standin_engine="sleep:1")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="unknown stand-in engine behaviour 'nap'"):
        WorkerSettings(_env_file=None, standin_engine="nap", i2v_test_tools=True)  # type: ignore[call-arg]
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    texts = [render(p, d) for p in PRESETS.values() for d in (None, "cuda", "npu", "cpu")]
    texts += [f.read_text() for f in deploy.rglob("*") if f.is_file()]
    assert not [t for t in texts if "I2V_TEST_TOOLS" in t or "STANDIN_ENGINE" in t]
