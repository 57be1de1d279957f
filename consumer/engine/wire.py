"""The parent/child protocol of the engine: the small frozen messages on the rank pipes.

Owns their shapes and EngineConfig (what a rank needs to load the model). Must never do I/O
or import torch: both sides import it, and everything here must pickle across a spawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from i2v_fleet.pipeline.layout import ParallelLayout  # pure Python: no torch


class StopWhy(StrEnum):
    """Why a job was asked to stop; it comes back on the JobStopped so the caller can tell
    a cancel from a timeout without remembering what it asked."""

    CANCEL = "cancel"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


# -- messages, parent -> child ---------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    job_id: str
    request: Any  # pipeline.GenerationRequest (a picklable dataclass with a PIL image)
    out_dir: str
    fps: int


@dataclass(frozen=True)
class StopJob:
    job_id: str
    why: StopWhy
    reason: str = ""
    """What the caller wants said about the stop (a cancel's reason); may be empty."""


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class KeepAlive:
    """Rank 0 to the other ranks while idle: nothing to do, the group is alive."""


# -- messages, child -> parent ---------------------------------------------------------


@dataclass(frozen=True)
class RankInfo:
    """What one rank holds once loaded (shown on /info, checked by the tests)."""

    rank: int
    device: str
    text_encoder: bool
    transformer_param_bytes: int
    peak_rss_bytes: int
    pid: int


@dataclass(frozen=True)
class EngineReady:
    device: str
    load_s: float
    ranks: tuple[RankInfo, ...] = ()
    attention_backend: str = ""
    """The attention kernel every rank runs (ATTENTION_BACKEND, resolved)."""
    attention_timings_ms: dict[str, float] = field(default_factory=dict)
    """With ATTENTION_BACKEND=auto: ms per attention call of each kernel timed."""
    compile_s: float | None = None
    """With TORCH_COMPILE: seconds the warm-up (compiling) took; None when not compiled."""


@dataclass(frozen=True)
class EngineFailed:
    message: str
    configuration: bool = False
    """The node's own settings are at fault (a backend it cannot run, a checkpoint it
    refuses, blocks that do not compile): starting again cannot help."""


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    phase: str
    step: int
    total: int


@dataclass(frozen=True)
class JobDone:
    job_id: str
    video_path: str
    poster_path: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobStopped:
    job_id: str
    step: int
    total_steps: int
    why: StopWhy
    """The stop the engine honoured: the StopJob's, or SHUTDOWN when the engine was closed."""
    reason: str = ""
    """The honoured StopJob's reason, unchanged."""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    code: str
    """A schemas ErrorCode value (the pipeline error's `code`)."""
    message: str
    retryable: bool
    fatal: bool = False
    """The ranks fell out of step: the engine exits and must be restarted."""


@dataclass(frozen=True)
class RankExited:
    """A rank's pipe closed: the process is gone (the host's own marker, never sent)."""

    rank: int


# -- what the ranks are started with -----------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """What the ranks need to load the model (plain values: it crosses a spawn)."""

    model_dir: str
    device: str | None = None
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    """How the ranks share a job (NPROC, ULYSSES_SIZE, CFG_SIZE, FSDP, T5_CPU, ...)."""
    cards: tuple[int, ...] = ()
    """The device indices of this engine's ranks (a lane's cards); () = 0..nproc-1."""
    collective_timeout_s: float = 600.0
    """How long a rank waits in a collective before the engine counts as broken."""
    attention_backend: str = "native"
    """ATTENTION_BACKEND: a diffusers backend name, or auto."""
    torch_compile: bool = False
    warmup_sizes: tuple[tuple[int, int, int], ...] = ((1280, 720, 81), (720, 1280, 81))
    """(width, height, frames) the compiled engine warms at; auto times the largest."""
    loras: str = ""
    """MODEL_LORAS: `path[:scale],...` adapters fused into the transformer at load."""
    node_id: str = ""
    """The node (lane) these ranks serve: every rank's log lines carry it."""
    fault: str = ""
    """Testing only: `kind:rank:step` makes a rank fail (see `faults.install_fault`)."""

    @property
    def nproc(self) -> int:
        return self.layout.nproc

    def rank_device(self, rank: int) -> str:
        """This rank's device: its card of the lane on cuda/npu, the CPU otherwise."""
        if self.device == "cpu":
            return "cpu"
        from i2v_fleet.pipeline.devices import detect_kind

        kind = detect_kind(self.device)
        if kind == "cpu":
            return "cpu"
        cards = self.cards or tuple(range(self.nproc))
        return f"{kind}:{cards[rank]}"
