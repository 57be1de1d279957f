"""Fixtures of the fleet suites: fresh topics and a fleet of worker processes per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from i2v_fleet.producer_sdk.admin import create_topics
from i2v_fleet.schemas import TopicNames, topic_specs

from .harness import Fleet

PARTITIONS = 4


@pytest.fixture
def fleet_topics(cluster: Any) -> TopicNames:
    names = TopicNames().with_suffix(f".f{uuid.uuid4().hex[:8]}")
    asyncio.run(create_topics(cluster.kafka, topic_specs(names, partitions=PARTITIONS)))
    return names


@pytest.fixture
def make_fleet(
    cluster: Any, fleet_topics: TopicNames, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Fleet]]:
    """`make_fleet(s3_endpoint=None, **env)`: a fleet on this test's topics; on teardown
    every node is killed and the tail of each log printed (pytest shows it on failure)."""
    fleets: list[Fleet] = []

    def make(s3_endpoint: str | None = None, **env: str) -> Fleet:
        fleet = Fleet(
            kafka=cluster.kafka.bootstrap_servers,
            s3_endpoint=s3_endpoint or cluster.s3.endpoint,
            s3=cluster.s3,
            topics=fleet_topics,
            model_dir=tiny_model_dir,
            tmp=tmp_path,
            **env,
        )
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()
        for node in fleet.history:
            print(f"--- {node.log.name} ---")
            print(node.log.read_text(errors="replace")[-3000:])
