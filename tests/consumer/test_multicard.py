"""`i2v worker` with several ranks per engine, and with lanes, on the local stack (CPU, gloo).

`NPROC=4 ULYSSES_SIZE=2 CFG_SIZE=2` (plus FSDP, T5 on rank 0 and VAE parallel) serves a
job end to end with the tiny model; `LANES=2` runs two lanes (two supervisors, each with its
own engine: here the stand-in engine, the ranks being covered above) that claim and run two
jobs at once.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from i2v_fleet.pipeline import probe_mp4
from i2v_fleet.producer_sdk.admin import create_topics
from i2v_fleet.schemas import SucceededEvent, TopicNames, topic_specs
from tests.conftest import Cluster, run_worker

from .test_worker import _events, _job

# Four rank processes start and run on two cores: more than the default 120 s per test.
pytestmark = [
    pytest.mark.timeout(360),
    pytest.mark.kafka,
    pytest.mark.minio,
    pytest.mark.slow,
    pytest.mark.distributed,
]

RANKS_ENV = {
    "NPROC": "4",
    "ULYSSES_SIZE": "2",
    "CFG_SIZE": "2",
    "DIT_FSDP": "true",
    "T5_CPU": "true",
    "VAE_PARALLEL": "true",
    # Four ranks share two cores here: give a silent phase room.
    "ENGINE_STALL_TIMEOUT": "90",
    "COLLECTIVE_TIMEOUT_S": "90",
}


def _topics(cluster: Cluster) -> TopicNames:
    names = TopicNames().with_suffix(f".m{uuid.uuid4().hex[:8]}")
    asyncio.run(create_topics(cluster.kafka, topic_specs(names, partitions=2)))
    return names


@pytest.fixture(scope="module")
def ranks_topics(cluster: Cluster) -> TopicNames:
    return _topics(cluster)


@pytest.fixture(scope="module")
def ranks_worker(
    cluster: Cluster,
    ranks_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    yield from run_worker(cluster, ranks_topics, tiny_model_dir, tmp_path_factory, RANKS_ENV)


async def test_four_ranks_serve_a_job_end_to_end(
    ranks_worker: Any, cluster: Cluster, ranks_topics: TopicNames, tmp_path: Path
) -> None:
    url = f"{ranks_worker.ops_url}/info"
    info = json.loads(
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    )
    assert info["layout"] | {"lanes": 1} == {
        "nproc": 4,
        "lanes": 1,
        "ulysses_size": 2,
        "cfg_size": 2,
        "dit_fsdp": True,
        "t5_fsdp": False,
        "t5_cpu": True,
        "vae_parallel": True,
    }
    ranks = info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["text_encoder"] for r in ranks] == [True, False, False, False]
    print("per-rank peak RSS (MiB):", [round(r["peak_rss_bytes"] / 2**20) for r in ranks])

    job = _job(guidance_scale=3.0)
    producer = AIOKafkaProducer(**cluster.kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(ranks_topics.requests, job.model_dump_json().encode(), job.key)
    finally:
        await producer.stop()
    events = await _events(cluster.kafka, ranks_topics.status, job.job_id, timeout=240)
    assert [e.type for e in events][-1] == "succeeded", events
    final = events[-1]
    assert isinstance(final, SucceededEvent)
    video = await asyncio.to_thread(
        lambda: urllib.request.urlopen(final.result.url, timeout=10).read()
    )
    path = tmp_path / f"{job.job_id}.mp4"
    path.write_bytes(video)
    try:
        probed = probe_mp4(path)
    finally:
        path.unlink()
    assert (probed.width, probed.height, probed.num_frames) == (480, 832, 5)


@pytest.fixture(scope="module")
def lanes_topics(cluster: Cluster) -> TopicNames:
    return _topics(cluster)


@pytest.fixture(scope="module")
def lanes_worker(
    cluster: Cluster,
    lanes_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {"LANES": "2", "STANDIN_ENGINE": "pace:1.0", "I2V_TEST_TOOLS": "true"}
    yield from run_worker(
        cluster, lanes_topics, tiny_model_dir, tmp_path_factory, env, ready_marks=2
    )


async def test_two_lanes_run_two_jobs_at_once(
    lanes_worker: Any, cluster: Cluster, lanes_topics: TopicNames
) -> None:
    jobs = [_job(), _job()]
    producer = AIOKafkaProducer(**cluster.kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        # One job per partition: the two lanes hold one partition each.
        for partition, job in enumerate(jobs):
            await producer.send_and_wait(
                lanes_topics.requests, job.model_dump_json().encode(), job.key, partition=partition
            )
    finally:
        await producer.stop()
    runs = await asyncio.gather(
        *(_events(cluster.kafka, lanes_topics.status, j.job_id, timeout=240) for j in jobs)
    )
    for events in runs:
        assert [e.type for e in events][-1] == "succeeded", events
    nodes = {events[0].node_id for events in runs}
    assert nodes == {"test-node-1-lane0", "test-node-1-lane1"}
    # Both ran at the same time: each started before the other finished.
    (a_start, a_end), (b_start, b_end) = ((e[0].time, e[-1].time) for e in runs)
    assert a_start < b_end
    assert b_start < a_end
