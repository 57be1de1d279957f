"""The node configuration presets of `i2v config`: the seed's templates in our setting names.

Owns the preset table and its rendering as an env file. Pure data and string building:
must never read the environment or touch a device (the worker's settings read the file).

The seed's MAX_CONCURRENT_TASKS admitted that many tasks into one process sharing all the
cards; here Kafka holds the queue, and the nearest knob is LANES: independent engines,
each running one job on NPROC = cards / LANES cards. A node is assumed to have 8 cards and
the model 40 attention heads (Wan2.1-I2V-14B), so ULYSSES_SIZE x CFG_SIZE == NPROC and
ULYSSES_SIZE divides 40 in every preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from i2v_fleet.pipeline.layout import ParallelLayout

NODE_CARDS = 8
MODEL_HEADS = 40
DEVICES = ("cuda", "npu", "cpu")

Env = Mapping[str, str]


@dataclass(frozen=True)
class Preset:
    """One template: the worker settings it sets, and what differs per device library."""

    name: str
    purpose: str
    """One line: what the preset is for."""
    notes: tuple[str, ...]
    """What it changes and why, written into the file's header."""
    seed_concurrency: int | None
    """The seed template's MAX_CONCURRENT_TASKS (None: the seed gave no value)."""
    worker: Env
    """Variables `WorkerSettings` reads (the layout, timeouts, caches)."""
    npu: Env = field(default_factory=dict)
    """Overrides of the Ascend library variables (HCCL_*, ASCEND_*, ...)."""
    cuda: Env = field(default_factory=dict)
    """Overrides of the CUDA library variables (NCCL_*, CUDA_*, ...)."""

    @property
    def t5_cpu(self) -> bool:
        return self.worker.get("T5_CPU") == "true"


_ALL_CARDS = ParallelLayout(nproc=8, ulysses_size=8, cfg_size=1, dit_fsdp=True, vae_parallel=True)
"""The seed's default layout: Ulysses 8 over the 40 heads, the DiT sharded, split VAE decode."""


def _layout(lanes: int, layout: ParallelLayout) -> dict[str, str]:
    """LANES and every field of one lane's layout, as the variables WorkerSettings reads."""
    return _env(lanes=lanes, **layout.as_fields())


def _env(**values: int | bool) -> dict[str, str]:
    return {
        name.upper(): ("true" if value else "false") if isinstance(value, bool) else str(value)
        for name, value in values.items()
    }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="development",
            purpose="one card, one job, text encoder on the CPU: quick to start and to debug",
            notes=(
                "One rank (NPROC=1): no sharding or split decode, so nothing to synchronise;",
                "the other cards stay free. T5 on the CPU keeps the card's memory for the DiT.",
                "TASK_TIMEOUT=3600: a single card is several times slower than eight.",
            ),
            seed_concurrency=1,
            worker={
                **_layout(1, ParallelLayout(nproc=1, t5_cpu=True)),
                **_env(use_attention_cache=False),
                "TASK_TIMEOUT": "3600",
            },
            npu={"ASCEND_GLOBAL_LOG_LEVEL": "0"},
            cuda={"NCCL_DEBUG": "INFO"},
        ),
        Preset(
            name="production",
            purpose="all 8 cards on one job at a time, attention cache on: the fastest per job",
            notes=(
                "LANES=1 (the seed admitted 5 tasks at once): one job on all 8 cards is the",
                "fastest per job; the backlog waits in Kafka, where any idle node can take it.",
                "Ulysses 8 over the 40 heads, the DiT FSDP-sharded, T5 whole on every card,",
                "split VAE decode, and the attention cache for jobs that do not choose one.",
            ),
            seed_concurrency=5,
            worker={
                **_layout(1, _ALL_CARDS),
                **_env(use_attention_cache=True),
                "TASK_TIMEOUT": "1800",
            },
        ),
        Preset(
            name="memory_efficient",
            purpose="two jobs at once on 4 cards each, T5 on the CPU: fits 24-32 GB cards",
            notes=(
                "LANES=2 x NPROC=4 (the seed's 2 concurrent tasks and ULYSSES_SIZE=4): about",
                "10.5 GiB of weights per card (docs/PARALLEL.md), T5 on each lane's rank-0 CPU.",
                "VAE_PARALLEL stays on, unlike the seed's template: our split decode gives each",
                "rank a band of rows, so no card holds the whole decode as rank 0 does alone.",
                "TASK_TIMEOUT=2400: each job has half the cards.",
            ),
            seed_concurrency=2,
            worker={
                **_layout(2, replace(_ALL_CARDS, nproc=4, ulysses_size=4, t5_cpu=True)),
                **_env(use_attention_cache=False),
                "TASK_TIMEOUT": "2400",
            },
            npu={"HCCL_TIMEOUT": "3600"},
        ),
        Preset(
            name="high_quality",
            purpose="production's layout without the attention cache, with time for 50-step jobs",
            notes=(
                "Every step computed (USE_ATTENTION_CACHE=false: the cache reuses attention",
                "outputs, an approximation). T5 on the cards. The node has no precision knob:",
                "DiT and T5 run in the model's bf16, CLIP and the VAE in fp32, and the split",
                "decode is exact. Steps, cfg and solver are the job's (quality_preset=high:",
                "50 steps, cfg 4.0, dpm++); TASK_TIMEOUT=3600 leaves time for them.",
            ),
            seed_concurrency=None,
            worker={
                **_layout(1, _ALL_CARDS),
                **_env(use_attention_cache=False),
                "TASK_TIMEOUT": "3600",
            },
        ),
        Preset(
            name="debug",
            purpose="production's layout with blocking launches and verbose device logs",
            notes=(
                "The seed's default layout (Ulysses 8, DIT_FSDP, split decode) so faults",
                "reproduce as in production; T5 on the CPU; no attention cache.",
                "Kernel launches block, so errors point at the failing op; TASK_TIMEOUT=7200,",
                "and COLLECTIVE_TIMEOUT_S / ENGINE_STALL_TIMEOUT at 1800 so a rank held in a",
                "debugger or slowed by blocking launches is not taken for a broken engine.",
            ),
            seed_concurrency=1,
            worker={
                **_layout(1, replace(_ALL_CARDS, t5_cpu=True)),
                **_env(use_attention_cache=False),
                "TASK_TIMEOUT": "7200",
                "COLLECTIVE_TIMEOUT_S": "1800",
                "ENGINE_STALL_TIMEOUT": "1800",
            },
            npu={"ASCEND_GLOBAL_LOG_LEVEL": "0", "ASCEND_LAUNCH_BLOCKING": "1"},
            cuda={"NCCL_DEBUG": "INFO", "CUDA_LAUNCH_BLOCKING": "1"},
        ),
    )
}


def library_env(preset: Preset, device: str) -> dict[str, str]:
    """The device libraries' variables for `device` (not worker settings: torch, HCCL,
    NCCL and the BLAS libraries read them). The seed's defaults, with its T5-on-CPU column
    where the preset puts T5 on the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    cards = ",".join(str(i) for i in range(NODE_CARDS))
    env: dict[str, str] = {}
    if device == "npu":
        env |= {
            "HCCL_TIMEOUT": "2400" if preset.t5_cpu else "1800",
            "HCCL_CONNECT_TIMEOUT": "900" if preset.t5_cpu else "600",
            "HCCL_BUFFSIZE": "256" if preset.t5_cpu else "512",
            "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
            "TASK_QUEUE_ENABLE": "2",
            "CPU_AFFINITY_CONF": "1",
            "ASCEND_LAUNCH_BLOCKING": "0",
            "ASCEND_GLOBAL_LOG_LEVEL": "1",
            "NPU_VISIBLE_DEVICES": cards,
            "ASCEND_RT_VISIBLE_DEVICES": cards,
        }
        env |= preset.npu
    elif device == "cuda":
        env |= {
            "NCCL_TIMEOUT": "3600",
            "NCCL_DEBUG": "WARN",
            "NCCL_IB_DISABLE": "1",
            "NCCL_P2P_DISABLE": "0",
            "CUDA_LAUNCH_BLOCKING": "0",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            "CUDA_VISIBLE_DEVICES": cards,
        }
        env |= preset.cuda
    threads = "16" if preset.t5_cpu else "8"
    env |= {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def worker_env(preset: Preset, device: str | None = None) -> dict[str, str]:
    """The `WorkerSettings` variables of `preset` (DEVICE only when `device` is given)."""
    env = dict(preset.worker)
    if device is not None:
        env["DEVICE"] = device
    return env


def render(preset: Preset, device: str | None = None) -> str:
    """The env file: a header saying what the preset is for, the worker settings, and the
    device libraries' variables when `device` names one."""
    lines = [
        f"# i2v-fleet node configuration: preset {preset.name}"
        + (f", device {device}" if device else ""),
        f"# {preset.purpose}",
        "#",
        *(f"# {note}" for note in preset.notes),
        "#",
        f"# Written by `i2v config --preset {preset.name}"
        + (f" --device {device}`." if device else "`."),
        "",
        "# -- worker settings (consumer/settings.py) --",
        *(f"{name}={value}" for name, value in worker_env(preset, device).items()),
    ]
    if device is not None:
        lines += [
            "",
            f"# -- {device} libraries (read by torch and its libraries, not by the worker) --",
            "# The engine bounds its collectives with COLLECTIVE_TIMEOUT_S "
            f"({preset.worker.get('COLLECTIVE_TIMEOUT_S', '600')} s here).",
            *(f"{name}={value}" for name, value in library_env(preset, device).items()),
        ]
    lines += [
        "",
        "# -- set for your fleet (not part of the preset) --",
        "# MODEL_CKPT_DIR=/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P",
        "# KAFKA_BOOTSTRAP_SERVERS=kafka:9092",
        "# MINIO_ENDPOINT=minio:9000",
        "# MINIO_ACCESS_KEY=...",
        "# MINIO_SECRET_KEY=...",
        "",
    ]
    return "\n".join(lines)


def parse_env(text: str) -> dict[str, str]:
    """NAME=value lines of an env file (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"line {number} is not NAME=value: {raw!r}")
        env[name] = value
    return env
