"""The broker watch and the Kafka log filter, in process (no broker): when a node calls the
broker lost and back, and how much of the client's reconnect noise reaches the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from i2v_fleet.consumer.broker import BrokerWatch, KafkaNoise


class _Probe:
    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("broker gone")


async def test_lost_after_the_bound_and_back_at_the_first_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One failed probe is not an outage; no answer for `down_after_s` is; one answer ends it."""
    probe = _Probe()
    watch = BrokerWatch(probe, interval_s=0.05, timeout_s=0.05)
    assert await watch.check()
    probe.up = False
    assert not await watch.check()
    assert watch.reachable  # a single miss: not yet
    await asyncio.sleep(watch.down_after_s)
    with caplog.at_level(logging.WARNING, logger="i2v_fleet.consumer.broker"):
        await watch.check()
        assert not watch.reachable
        assert watch.down_for_s >= 0
        probe.up = True
        await watch.check()
    assert watch.reachable
    lines = [r for r in caplog.records if r.name == "i2v_fleet.consumer.broker"]
    assert [getattr(r, "kafka_outage", None) for r in lines] == ["started", "ended"]


async def test_the_watch_runs_on_its_own_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    probe = _Probe()
    watch = BrokerWatch(probe, interval_s=0.02, timeout_s=0.02)
    watch.start()
    probe.up = False
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not watch.reachable:
            break
    assert not watch.reachable
    probe.up = True
    watch.suspect()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if watch.reachable:
            break
    assert watch.reachable
    await watch.stop()
    calls = probe.calls
    await asyncio.sleep(0.1)
    assert probe.calls == calls


def _record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_client_noise_is_held_back_during_an_outage_and_thinned_outside() -> None:
    noise = KafkaNoise(every_s=60)
    unable = "Unable connect to node with id %s: %s"
    # Outside an outage: each kind of line once per interval; our own lines always.
    assert noise.filter(_record("aiokafka.client", unable))
    assert not noise.filter(_record("aiokafka.client", unable))
    assert noise.filter(_record("aiokafka.consumer.fetcher", "Failed fetch messages"))
    assert noise.filter(_record("aiokafka.client", "debugging", logging.DEBUG))
    assert noise.filter(_record("i2v_fleet.consumer.supervisor", unable))
    # During an outage: none of the client's warnings, counted.
    noise.outage_started(1)
    assert not any(noise.filter(_record("aiokafka.conn", f"x{i}")) for i in range(250))
    assert noise.filter(_record("i2v_fleet.consumer.broker", "kafka broker still unreachable"))
    assert noise.outage_ended(1) == 250
    assert noise.filter(_record("aiokafka.conn", "after the outage"))
