"""The engine as the node uses it: the Protocol EngineHost and the stand-in engines share.

Owns the node's side of the engine seam. Must never hold behaviour: it is only a shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .wire import EngineReady, JobDone, JobProgress, JobStopped, RankInfo, RunJob, StopWhy


class Engine(Protocol):
    """Start, run one job at a time, stop a job at its next step, restart, close."""

    device: str
    ready: EngineReady | None
    ranks: tuple[RankInfo, ...]
    restarts: int

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None: ...
    async def restart(self) -> None: ...
    async def run(
        self, job: RunJob, on_progress: Callable[[JobProgress], Awaitable[None]]
    ) -> JobDone | JobStopped: ...
    async def stop_job(self, job_id: str, why: StopWhy, reason: str = "") -> None: ...
    async def close(self, timeout_s: float = 10.0) -> None: ...
    async def kill(self) -> None: ...
