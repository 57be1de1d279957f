"""Many nodes as one queue: no head-of-line blocking, shutdown hand-back, frozen nodes.

Real worker processes on the local stack with the tiny model; times are generous bounds
on what a user would notice, never performance assertions.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from i2v_fleet.pipeline import probe_mp4
from i2v_fleet.producer_sdk.transport import partition_for
from i2v_fleet.schemas import JobRequest, TopicNames

from .conftest import PARTITIONS
from .harness import Fleet, StatusLog, cheap_job, publish

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow, pytest.mark.timeout(300)]


def _jobs_in(partitions: set[int], count: int, **fields: Any) -> list[JobRequest]:
    """Cheap jobs whose keys land in the given partitions of i2v.requests."""
    found: list[JobRequest] = []
    while len(found) < count:
        job = cheap_job(job_id=str(uuid.uuid4()), **fields)
        if partition_for(job.key, PARTITIONS) in partitions:
            found.append(job)
    return found


async def _submit(cluster: Any, topics: TopicNames, *jobs: JobRequest) -> None:
    await publish(
        cluster.kafka, topics.requests, [(j.key, j.model_dump_json().encode()) for j in jobs]
    )


@pytest.mark.chaos
async def test_no_head_of_line_blocking_and_sigterm_hands_the_job_on(
    make_fleet: Callable[..., Fleet], cluster: Any, fleet_topics: TopicNames
) -> None:
    """While one node runs a long job, a job that lands in its partitions starts on the
    other node within 10 s (the busy node leaves the group, the idle one takes them).
    Then SIGTERM the busy node: after SHUTDOWN_GRACE its job stops at the next step, is
    re-published (`requeued`, reason shutdown) and finished by the other node well before
    a lease could expire."""
    lease_s = 30.0
    fleet = make_fleet(LEASE_S=str(lease_s), LEASE_GRACE_S="5", HEARTBEAT_S="2")
    fleet.start("a")
    fleet.start("b")
    fleet.wait_ready()
    await fleet.settled(PARTITIONS)
    async with StatusLog(cluster.kafka, fleet_topics.status) as status:
        long = cheap_job(infer_steps=100)
        await _submit(cluster, fleet_topics, long)
        await status.wait(lambda: status.first(long.job_id, "started"), 60, "the long job")
        busy = status.first(long.job_id, "started")[1].node_id  # type: ignore[index]
        idle = "b" if busy == "a" else "a"
        info = fleet.nodes[busy].info()
        assert info is not None
        [behind] = _jobs_in(set(info["requests_partitions"]), 1)

        submitted = time.monotonic()
        await _submit(cluster, fleet_topics, behind)
        await status.wait(lambda: status.first(behind.job_id, "started"), 30, "the short job")
        at, started = status.first(behind.job_id, "started")  # type: ignore[misc]
        print(
            f"head-of-line: a job behind the busy node started {at - submitted:.1f} s "
            "after submission"
        )
        assert started.node_id == idle
        assert at - submitted < 10
        assert status.final(long.job_id) is None  # the long job is still running

        # The idle node is free again, so the hand-back below measures the hand-back.
        await status.wait(lambda: status.final(behind.job_id), 60, "the short job to end")
        assert status.final(long.job_id) is None
        terminated = time.monotonic()
        fleet.signal(busy, signal.SIGTERM)
        await status.wait(
            lambda: status.first(long.job_id, "started", attempt=2), 90, "attempt 2 to start"
        )
        restarted_at, _ = status.first(long.job_id, "started", attempt=2)  # type: ignore[misc]
        for job in (long, behind):
            await status.wait(lambda j=job: status.final(j.job_id), 120, "every job to end")
        assert fleet.nodes[busy].proc.wait(30) == 0  # a clean exit after the hand-back

    assert status.final(behind.job_id).type == "succeeded"
    lifecycle = [
        (e.type, e.attempt, e.node_id) for e in status.of(long.job_id) if e.type != "heartbeat"
    ]
    assert lifecycle == [
        ("started", 1, busy),
        ("requeued", 1, busy),
        ("started", 2, idle),
        ("succeeded", 2, idle),
    ]
    requeued = status.first(long.job_id, "requeued")[1]  # type: ignore[index]
    assert requeued.reason == "shutdown"
    handover = restarted_at - terminated
    print(f"shutdown hand-back: attempt 2 started {handover:.1f} s after SIGTERM")
    assert handover < lease_s


@pytest.mark.chaos
async def test_a_frozen_node_loses_its_lease_and_its_late_result_is_still_valid(
    make_fleet: Callable[..., Fleet], cluster: Any, fleet_topics: TopicNames
) -> None:
    """SIGSTOP a node mid-job: its lease expires, a reaper re-publishes the job and the
    other node runs it. Resumed, the frozen node finishes too; its upload overwrites the
    same keys, and what is stored is a valid video either way."""
    fleet = make_fleet()
    fleet.start("a")
    fleet.start("b")
    fleet.wait_ready()
    await fleet.settled(PARTITIONS)
    async with StatusLog(cluster.kafka, fleet_topics.status) as status:
        job = cheap_job(infer_steps=30)
        await _submit(cluster, fleet_topics, job)
        await status.wait(lambda: status.first(job.job_id, "started"), 60, "the job to start")
        frozen = status.first(job.job_id, "started")[1].node_id  # type: ignore[index]
        await asyncio.sleep(2)
        fleet.signal_tree(frozen, signal.SIGSTOP)
        try:
            await status.wait(
                lambda: status.first(job.job_id, "succeeded", attempt=2), 150, "attempt 2"
            )
        finally:
            fleet.signal_tree(frozen, signal.SIGCONT)
        await status.wait(
            lambda: status.first(job.job_id, "succeeded", attempt=1), 120, "the late finisher"
        )

    events = status.of(job.job_id)
    requeued = [e for e in events if e.type == "requeued"]
    assert [(e.attempt, e.reason, e.next_attempt) for e in requeued] == [(1, "lease_expired", 2)]
    assert requeued[0].error.code == "worker_lost"
    other = "b" if frozen == "a" else "a"
    assert status.first(job.job_id, "started", attempt=2)[1].node_id == other  # type: ignore[index]
    # The first final event is attempt 2's; the late one points at the same, valid object.
    first_final = status.final(job.job_id)
    assert (first_final.type, first_final.attempt) == ("succeeded", 2)
    late = status.first(job.job_id, "succeeded", attempt=1)[1]  # type: ignore[index]
    assert late.result.key == first_final.result.key
    _assert_stored_video(cluster, late.result.key, late.result.sha256, 5, fleet.tmp)


def _assert_stored_video(cluster: Any, key: str, sha256: str, frames: int, tmp: Path) -> None:
    import hashlib

    s3 = cluster.s3
    client = Minio(
        s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key.get_secret_value(),
        secure=False,
    )
    response = client.get_object(s3.bucket, key)
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    assert hashlib.sha256(data).hexdigest() == sha256
    path = tmp / f"{sha256[:16]}.mp4"
    path.write_bytes(data)
    assert probe_mp4(path).num_frames == frames
