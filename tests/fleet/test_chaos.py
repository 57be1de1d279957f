"""Chaos: nodes killed with SIGKILL at every moment of a job, poison in the queue, and an
object-store outage. Nothing may be lost; every success must point at a valid video.

Prints the figures docs/RELIABILITY.md quotes: jobs lost, duplicate executions, and the
time from a kill to the affected job starting again.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from minio import Minio
from pydantic import TypeAdapter

from i2v_fleet.pipeline import probe_mp4
from i2v_fleet.schemas import JobRequest, TopicNames
from i2v_fleet.schemas import topics as wire

from .conftest import PARTITIONS
from .harness import Fleet, StatusLog, TcpProxy, cheap_job, publish

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.minio,
    pytest.mark.slow,
    pytest.mark.chaos,
    pytest.mark.timeout(900),
]

NODES = ("a", "b", "c")
# Each restart arms the next point: the node then dies exactly there on its next job.
FAILPOINT_PLAN = [
    "mid_denoise",
    "after_started",
    "mid_upload",
    "after_upload",
    "before_claim",
    "after_commit",
]
RANDOM_KILLS_AT = (8.0, 22.0, 36.0)  # seconds into the run: SIGKILL a random node
_JSON: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


async def test_kill_9_at_any_moment_loses_no_job(
    make_fleet: Callable[..., Fleet], cluster: Any, fleet_topics: TopicNames
) -> None:
    """30 jobs over 3 nodes, with nodes SIGKILLed at random times and at each named moment
    of a job (before claim, after `started`, after the commit, mid-denoise, mid-upload,
    after upload before the final event), restarted a second later, and poison and
    invalid records mixed in: every job ends with one first final event, `succeeded`,
    pointing at a decodable video; nothing is lost."""
    rng = random.Random(7)
    plan = list(FAILPOINT_PLAN)
    fleet = make_fleet(MAX_ATTEMPTS="10")
    for name in NODES:
        fleet.start(name, I2V_FAILPOINTS=plan.pop(0) if name != "c" else "")
    fleet.wait_ready()
    await fleet.settled(PARTITIONS, timeout=90)

    jobs = [cheap_job(infer_steps=2, guidance_scale=1.0, seed=i) for i in range(30)]
    invalid = [
        cheap_job().model_dump(mode="json") | {"num_frames": 80},
        cheap_job().model_dump(mode="json") | {"image_size": "123*456"},
        cheap_job().model_dump(mode="json") | {"guidance_scale": 50},
    ]
    invalid_ids = {str(r["job_id"]) for r in invalid}
    poison = [b"\xff\xfe not json", b'{"job_id": "not-a-uuid"']
    records: list[tuple[bytes | None, bytes]] = [
        (j.key, j.model_dump_json().encode()) for j in jobs
    ]
    for i, record in enumerate(invalid):
        records.insert(5 + 8 * i, (str(record["job_id"]).encode(), _JSON.dump_json(record)))
    for i, value in enumerate(poison):
        records.insert(9 + 12 * i, (b"poison", value))

    deaths: list[tuple[float, str]] = []
    async with StatusLog(cluster.kafka, fleet_topics.status) as status:
        began = time.monotonic()
        # Paced like a steady producer the three nodes keep up with, so the time from a
        # kill to the job's restart measures recovery, not a backlog ahead of it.
        submitter = asyncio.create_task(_paced(cluster, fleet_topics.requests, records, 1.5))
        random_kills = list(RANDOM_KILLS_AT)
        pending_restart: dict[str, float] = {}
        wanted = [j.job_id for j in jobs]

        def finished() -> bool:
            return all(status.final(job_id) for job_id in wanted) and all(
                any(str(e.job_id) == i for _, e in status.events) for i in invalid_ids
            )

        while not finished():
            now = time.monotonic()
            # A liveness bound, not a speed target: runs take 1-3 minutes on 2 cores.
            assert now - began < 600, "the chaos run did not finish in 10 minutes"
            if random_kills and now - began >= random_kills[0]:
                random_kills.pop(0)
                victim = rng.choice([n for n in NODES if fleet.nodes[n].running])
                fleet.kill(victim)
            for name in NODES:
                node = fleet.nodes[name]
                if not node.running and name not in pending_restart:
                    deaths.append((now, name))
                    pending_restart[name] = now + 1.0
                elif name in pending_restart and now >= pending_restart[name]:
                    del pending_restart[name]
                    fleet.start(name, I2V_FAILPOINTS=plan.pop(0) if plan else "")
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - began
        await submitter

    # -- every job ended, and each success points at a valid video ----------------------
    lost = [j.job_id for j in jobs if status.final(j.job_id) is None]
    finals = {j.job_id: status.final(j.job_id) for j in jobs}
    assert not lost
    assert {f.type for f in finals.values()} == {"succeeded"}, {
        str(k): (f.type, getattr(f, "error", None)) for k, f in finals.items()
    }
    for job in jobs:
        _assert_complete_result(cluster, job, finals[job.job_id], fleet.tmp)
    for job_id in invalid_ids:  # more than one only when a node died before its commit
        refused = {(e.type, e.error.code) for _, e in status.events if str(e.job_id) == job_id}
        assert refused == {("failed", "invalid_request")}
    dead_letters = await _read_values(cluster, fleet_topics.dlq, want=len(poison))
    assert set(dead_letters) == set(poison)

    # -- the figures -----------------------------------------------------------------------
    executions = {
        j.job_id: {
            (e.attempt, e.node_id, e.seq) for e in status.of(j.job_id) if e.type == "started"
        }
        for j in jobs
    }
    duplicates = sum(len(runs) - 1 for runs in executions.values())
    # One run, one final event: a second one only ever follows a node lost in between.
    for job in jobs:
        if len(executions[job.job_id]) == 1:
            assert [e.type for e in status.of(job.job_id)].count("succeeded") == 1
    handed_back, recoveries = _recoveries(status, deaths)
    armed = [name for name in FAILPOINT_PLAN if name not in plan]
    print(
        f"\nchaos: {len(jobs)} jobs + {len(invalid)} invalid + {len(poison)} poison over "
        f"{len(NODES)} nodes in {elapsed:.0f} s; {len(deaths)} kills "
        f"({len(RANDOM_KILLS_AT)} random, failpoints armed in turn: {', '.join(armed)})\n"
        f"chaos: jobs lost: {len(lost)}; extra executions (re-runs after a kill): "
        f"{duplicates}; jobs whose first final event was not succeeded: 0\n"
        f"chaos: kill -> affected job handed back (requeued, or its record re-delivered): "
        f"n={len(handed_back)} p50={_pct(handed_back, 50):.1f} s "
        f"p99={_pct(handed_back, 99):.1f} s\n"
        f"chaos: kill -> affected job started again: n={len(recoveries)} "
        f"p50={_pct(recoveries, 50):.1f} s p99={_pct(recoveries, 99):.1f} s "
        f"max={max(recoveries, default=0):.1f} s"
    )
    assert len(deaths) >= len(RANDOM_KILLS_AT) + 4  # the chaos actually happened


async def test_an_object_store_outage_delays_uploads_and_loses_nothing(
    make_fleet: Callable[..., Fleet], cluster: Any, fleet_topics: TopicNames
) -> None:
    """The store goes away for 12 s mid-run: uploads retry, every job succeeds, and no
    partial result is left (each job has its video, poster and a meta.json that matches)."""
    proxy = TcpProxy(cluster.s3.endpoint)
    proxy.up()
    fleet = make_fleet(s3_endpoint=proxy.endpoint, LEASE_S="20", LEASE_GRACE_S="5")
    fleet.start("a")
    fleet.start("b")
    fleet.wait_ready()
    jobs = [cheap_job(infer_steps=2, guidance_scale=1.0, seed=i) for i in range(8)]
    try:
        async with StatusLog(cluster.kafka, fleet_topics.status) as status:
            await publish(
                cluster.kafka,
                fleet_topics.requests,
                [(j.key, j.model_dump_json().encode()) for j in jobs],
            )
            await status.wait(
                lambda: any(status.final(j.job_id) for j in jobs), 180, "a first result"
            )
            proxy.down()
            await asyncio.sleep(12)
            proxy.up()
            await status.wait(
                lambda: all(status.final(j.job_id) for j in jobs), 300, "every job to end"
            )
    finally:
        proxy.down()

    assert {status.final(j.job_id).type for j in jobs} == {"succeeded"}
    for job in jobs:
        _assert_complete_result(cluster, job, status.final(job.job_id), fleet.tmp)
    logs = "".join(node.log.read_text(errors="replace") for node in fleet.history)
    assert "retrying" in logs  # the outage was felt, and ridden out


# -- helpers ---------------------------------------------------------------------------


def _client(cluster: Any) -> Minio:
    s3 = cluster.s3
    return Minio(
        s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key.get_secret_value(),
        secure=False,
    )


def _get(client: Minio, bucket: str, key: str) -> bytes:
    response = client.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _assert_complete_result(cluster: Any, job: JobRequest, final: Any, tmp: Path) -> None:
    """video, poster and meta.json all there; meta describes exactly the stored video."""
    client = _client(cluster)
    bucket, prefix = cluster.s3.bucket, f"jobs/{job.job_id}/"
    keys = {o.object_name for o in client.list_objects(bucket, prefix=prefix)}
    assert keys == {f"{prefix}video.mp4", f"{prefix}poster.jpg", f"{prefix}meta.json"}
    video = _get(client, bucket, f"{prefix}video.mp4")
    meta = _JSON.validate_json(_get(client, bucket, f"{prefix}meta.json"))
    digest = hashlib.sha256(video).hexdigest()
    assert meta["result"]["sha256"] == digest
    assert final.result.key == f"{prefix}video.mp4"
    path = tmp / f"{job.job_id}.mp4"
    path.write_bytes(video)
    assert probe_mp4(path).num_frames == job.num_frames


async def _read_values(cluster: Any, topic: str, want: int, timeout: float = 20) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, **cluster.kafka.client_kwargs(), auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                found.extend(r.value for r in records)
                assert all(dict(r.headers).get(wire.HEADER_ERROR_CODE) for r in records)
            if len(found) >= want and not batch:
                break
    finally:
        await consumer.stop()
    return found


def _recoveries(
    status: StatusLog, deaths: list[tuple[float, str]]
) -> tuple[list[float], list[float]]:
    """For each kill, and each job the killed node was running: seconds until the job was
    handed back (a reaper's `requeued`, or its record started again), and until it started
    again anywhere."""
    handed_back: list[float] = []
    restarted: list[float] = []
    for died_at, node in deaths:
        running: dict[Any, Any] = {}
        for at, e in status.events:
            if at > died_at:
                break
            if e.type == "started":
                running[e.job_id] = e
            elif e.type in ("succeeded", "failed", "cancelled", "requeued"):
                running.pop(e.job_id, None)
        for job_id, started in running.items():
            if started.node_id != node:
                continue
            later = [(at, e) for at, e in status.events if at > died_at and e.job_id == job_id]
            back = next((at for at, e in later if e.type in ("requeued", "started")), None)
            again = next((at for at, e in later if e.type == "started"), None)
            if back is not None:
                handed_back.append(back - died_at)
            if again is not None:
                restarted.append(again - died_at)
    return handed_back, restarted


async def _paced(
    cluster: Any, topic: str, records: list[tuple[bytes | None, bytes]], every_s: float
) -> None:
    for record in records:
        await publish(cluster.kafka, topic, [record])
        await asyncio.sleep(every_s)


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]
