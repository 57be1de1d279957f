"""Owns the persistent engine: rank processes that load the model once, and their host.
Must never block the node's event loop, nor decide a job's fate: callers do, from its errors."""

from __future__ import annotations

from .failures import EngineDied, EngineMisconfigured
from .host import EngineHost
from .state import EngineState
from .wire import (
    EngineConfig,
    EngineReady,
    JobDone,
    JobFailed,
    JobProgress,
    JobStopped,
    RankInfo,
    RunJob,
    StopWhy,
)

__all__ = [
    "EngineConfig",
    "EngineDied",
    "EngineHost",
    "EngineMisconfigured",
    "EngineReady",
    "EngineState",
    "JobDone",
    "JobFailed",
    "JobProgress",
    "JobStopped",
    "RankInfo",
    "RunJob",
    "StopWhy",
]
