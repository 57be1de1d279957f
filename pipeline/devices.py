"""Which accelerator this process runs on, its dtype, and what `i2v doctor` reports of it.

Owns device detection for cuda, npu (torch_npu imported only when present) and cpu.
Must never initialise a device as a side effect of import.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

import torch

DeviceKind = str  # "cuda" | "npu" | "cpu"


@dataclass(frozen=True)
class DeviceInfo:
    kind: DeviceKind
    index: int
    name: str
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


@cache
def npu_available() -> bool:
    """True when torch_npu is installed and sees at least one Ascend NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def detect_kind(prefer: str | None = None) -> DeviceKind:
    """`prefer` if given (cuda/npu/cpu), else the first of cuda, npu, cpu that is present."""
    if prefer:
        if prefer not in {"cuda", "npu", "cpu"}:
            raise ValueError(f"device must be cuda, npu or cpu; got {prefer!r}")
        return prefer
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


def default_dtype(kind: DeviceKind) -> torch.dtype:
    """bf16 on accelerators (the model's native precision), fp32 on CPU (bf16 is slow there)."""
    return torch.float32 if kind == "cpu" else torch.bfloat16


def device_count(kind: DeviceKind) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return int(torch.npu.device_count()) if npu_available() else 0  # type: ignore[attr-defined]
    return 1


def list_devices(kind: DeviceKind | None = None) -> list[DeviceInfo]:
    """Every card of the detected kind with its memory (the CPU counts as one device)."""
    kind = kind or detect_kind()
    if kind == "cpu":
        return [DeviceInfo("cpu", 0, _cpu_name(), *_host_memory())]
    backend = torch.cuda if kind == "cuda" else torch.npu  # type: ignore[attr-defined]
    devices = []
    for i in range(device_count(kind)):
        free, total = backend.mem_get_info(i)
        devices.append(DeviceInfo(kind, i, backend.get_device_name(i), int(total), int(free)))
    return devices


def is_out_of_memory(exc: BaseException) -> bool:
    """OOM on any backend: torch's own class, or the message NPU and older builds use."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _host_memory() -> tuple[int | None, int | None]:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError):
        return None, None
