"""What a node says about itself: its counters, and the NodeInfo it writes to `i2v.nodes`.

Owns the node's state as others see it (starting, ready, busy, draining, stopped), the
counters behind /info and NodeInfo, and the memory figures (host, and each card where the
driver's tool answers) that `i2v monitor --alert-on-high-memory` reads. Must never claim,
run or end a job; it only reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from i2v_fleet.schemas import (
    DeviceInfo,
    DeviceKind,
    JobRequest,
    Layout,
    NodeInfo,
    NodeState,
    served_presets,
    utcnow,
)
from i2v_fleet.schemas.nodes import HostMemory

from .events import Emitter
from .outcome import Ending, Outcome

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counters the ops endpoints and NodeInfo report."""

    outcomes: dict[str, int] = field(default_factory=dict)
    current: JobRequest | None = None
    current_phase: str = ""
    current_step: tuple[int, int] = (0, 0)
    started_at: float = field(default_factory=time.monotonic)

    def count(self, outcome: Outcome) -> None:
        self.outcomes[outcome.label] = self.outcomes.get(outcome.label, 0) + 1

    def total(self, ending: Ending) -> int:
        prefix = ending.value
        return sum(n for k, n in self.outcomes.items() if k.split(":")[0] == prefix)


@dataclass
class NodeFacts:
    """What NodeInfo says that others own: read each time NodeInfo is built."""

    node_id: str
    layout: Callable[[], Layout]
    device: Callable[[], str]
    attention_backend: Callable[[], str | None]
    ops_url: Callable[[], str | None]
    distilled: bool = False


class Announcer:
    """Writes NodeInfo now and every `interval_s`, and at once when `poke()`d."""

    def __init__(self, emitter: Emitter, facts: NodeFacts, stats: Stats, interval_s: float):
        self.emitter = emitter
        self.facts = facts
        self.stats = stats
        self.interval_s = interval_s
        self.state = NodeState.STARTING
        self.state_since = utcnow()
        self._now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Announce at once (the node's state changed)."""
        self._now.set()

    def start(self, state: Callable[[], NodeState]) -> None:
        self._task = asyncio.create_task(self._loop(state), name="i2v-node-info")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def stopped(self) -> None:
        """The last NodeInfo: this node is gone (best effort; the caller bounds it). The loop
        is over first, so no later `draining` can land after it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._enter(NodeState.STOPPED)
        await self.emitter.node_info(await self.node_info(NodeState.STOPPED))

    async def _loop(self, state: Callable[[], NodeState]) -> None:
        while True:
            now = state()
            self._enter(now)
            try:
                await self.emitter.node_info(await self.node_info(now))
            except Exception as exc:
                log.warning("node info not sent: %s", exc)
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the wait ends, and the loop would outlive its node.
            poked = asyncio.ensure_future(self._now.wait())
            try:
                await asyncio.wait({poked}, timeout=self.interval_s)
            finally:
                poked.cancel()
            self._now.clear()

    def _enter(self, state: NodeState) -> None:
        if state is not self.state:
            self.state, self.state_since = state, utcnow()

    async def node_info(self, state: NodeState) -> NodeInfo:
        f, stats = self.facts, self.stats
        device = f.device()
        kind = DeviceKind(device.split(":")[0]) if device else DeviceKind.CPU
        memory, devices = await asyncio.gather(
            asyncio.to_thread(host_memory), asyncio.to_thread(card_memory, kind)
        )
        return NodeInfo(
            node_id=f.node_id,
            hostname=platform.node(),
            version=versions().get("i2v-fleet", "unknown"),
            state=state,
            state_since=self.state_since,
            device=kind,
            devices=devices,
            memory=memory,
            layout=f.layout(),
            current_jobs=[stats.current.job_id] if stats.current else [],
            jobs_succeeded=stats.total(Ending.SUCCEEDED),
            jobs_failed=stats.total(Ending.FAILED),
            uptime_s=time.monotonic() - stats.started_at,
            ops_url=f.ops_url(),
            presets=[p.value for p in served_presets(f.distilled)],
            attention_backend=f.attention_backend(),
        )


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> HostMemory | None:
    """The host's memory in use (total less available), from the kernel's own count."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return HostMemory(total_bytes=total, used_bytes=max(0, total - available))


def card_memory(kind: DeviceKind, timeout_s: float = 5.0) -> list[DeviceInfo]:
    """Each CUDA card's memory from nvidia-smi (the driver's tool: no CUDA context in this
    process, which must not hold one). Empty on other devices or when it does not answer."""
    tool = shutil.which("nvidia-smi") if kind is DeviceKind.CUDA else None
    if tool is None:
        return []
    query = "--query-gpu=index,name,memory.total,memory.used"
    try:
        out = subprocess.run(
            [tool, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
        return [_card(line) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("nvidia-smi did not answer: %s", exc)
        return []


def _card(line: str) -> DeviceInfo:
    index, name, total_mib, used_mib = (part.strip() for part in line.split(","))
    mib = 1024 * 1024
    return DeviceInfo(
        index=int(index),
        name=name,
        memory_total_bytes=int(float(total_mib) * mib),
        memory_used_bytes=int(float(used_mib) * mib),
    )


@functools.cache
def versions() -> dict[str, str]:
    """Package versions, read from installed metadata once (file I/O, not per job)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("i2v-fleet", "torch", "diffusers", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found
