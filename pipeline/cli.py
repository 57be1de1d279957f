"""`i2v model tiny` and `i2v doctor`: the engine's commands.

Owns their command line: doctor's checks of devices, memory, the model directory and the
text encoder's warm-up. Imports torch and diffusers only inside the commands, so the `i2v`
command starts fast and says which extra to install when they are missing. The node's
layout is checked by `i2v config check` (consumer/config_cli.py), which reads the node's
settings as the worker does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

model_app = typer.Typer(help="Model directories: make a tiny one for tests and demos.")

ModelDir = Annotated[
    Path,
    typer.Option(
        "--model-dir",
        envvar="MODEL_CKPT_DIR",
        help="Checkpoint in the diffusers layout [env: MODEL_CKPT_DIR].",
    ),
]


def require_worker_extra(command: str) -> None:
    """Exit with a one-line hint when the engine's packages are not installed."""
    missing = [m for m in ("torch", "diffusers", "transformers") if not importlib.util.find_spec(m)]
    if missing:
        err.print(
            f"[red]error:[/] {command} needs the 'worker' extra (missing: {', '.join(missing)}): "
            "pip install 'i2v-fleet[worker]'"
        )
        raise typer.Exit(1)


@model_app.command("tiny")
def tiny(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny Wan2.1 I2V (random weights, ~1 MB) in the real checkpoint's layout."""
    require_worker_extra("i2v model tiny")
    from .tiny import write_tiny_model

    err.print(f"Writing a tiny Wan2.1 I2V to {out_dir} ...")
    path = write_tiny_model(out_dir, seed=seed)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    out.print(f"{path}  ({size / 1024:.0f} KiB; MODEL_CKPT_DIR={path})")


DEVICE_KINDS = ("cuda", "npu", "cpu")
T5_MAX_LENGTH = 512  # GenerationRequest.max_sequence_length: the engine always pads to it
WARMUP_PROMPT = (
    "A cat in a small boat drifts across a calm lake at sunset, the camera slowly circling."
)


def _device_option(value: str | None) -> str | None:
    if value is not None and value not in DEVICE_KINDS:
        raise typer.BadParameter(
            f"unknown device {value!r}; choose one of {', '.join(DEVICE_KINDS)}"
        )
    return value


def doctor(
    model_dir: ModelDir = Path("/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P"),
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Also load the model and run one tiny generation.")
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            envvar="DEVICE",
            callback=_device_option,
            help="cuda, npu or cpu (default: the first present of cuda, npu, cpu).",
            show_default=False,
        ),
    ] = None,
    t5_cpu: Annotated[
        bool,
        typer.Option(
            "--t5-cpu/--no-t5-cpu",
            envvar="T5_CPU",
            help="The text encoder on the CPU, as T5_CPU places it.",
        ),
    ] = False,
    t5_warmup: Annotated[
        bool,
        typer.Option(
            "--t5-warmup",
            help="Load only the tokenizer and text encoder; time --warmup-steps encodes.",
        ),
    ] = False,
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", min=1, help="Encodes to time with --t5-warmup.")
    ] = 3,
) -> None:
    """Check this machine: devices and memory, library versions, and the model directory."""
    require_worker_extra("i2v doctor")
    import diffusers
    import torch
    import transformers

    from .devices import detect_kind, device_count, list_devices, npu_available
    from .errors import PipelineError
    from .loading import check_checkpoint

    kind = detect_kind(device)
    versions = Table("component", "version", title="software")
    versions.add_row("python", platform.python_version())
    versions.add_row("torch", torch.__version__)
    versions.add_row("diffusers", diffusers.__version__)
    versions.add_row("transformers", transformers.__version__)
    versions.add_row("cuda (torch build)", str(torch.version.cuda or "-"))
    npu_spec = importlib.util.find_spec("torch_npu") is not None
    versions.add_row("torch_npu", "importable" if npu_spec else "not installed")
    out.print(versions)

    ok = True
    present = kind == "cpu" or device_count(kind) > 0
    devices = Table("device", "name", "memory total", "memory free", title=f"devices ({kind})")
    for d in list_devices(kind) if present else []:
        devices.add_row(
            f"{d.kind}:{d.index}", d.name, _gib(d.memory_total_bytes), _gib(d.memory_free_bytes)
        )
    out.print(devices)
    if not present:
        ok = False
        out.print(f"[red]no {kind} device found[/]: check the driver, or pass --device cpu")
    elif kind == "cpu":
        out.print("No CUDA GPU or Ascend NPU found: the engine will run on the CPU (slow).")
    elif kind == "npu" and not npu_available():  # pragma: no cover - defensive
        out.print("torch_npu is installed but sees no NPU.")

    model_ok = True
    try:
        check_checkpoint(model_dir)
        out.print(f"[green]model directory OK[/]: {model_dir}")
    except PipelineError as exc:
        ok = model_ok = False
        out.print(f"[red]model directory problem[/]: {exc}")
    if t5_warmup and model_ok and present:
        ok = _t5_warmup(model_dir, kind, t5_cpu, warmup_steps) and ok
    if ok and smoke:
        ok = _smoke(model_dir, kind, t5_cpu)
    out.print(_memory_table(kind if present else "cpu"))
    raise typer.Exit(0 if ok else 1)


def _t5_warmup(model_dir: Path, kind: str, t5_cpu: bool, steps: int) -> bool:
    """Load the tokenizer and text encoder alone, as the engine places them, and time
    `steps` encodes of a prompt padded as the engine pads it."""
    import time

    import torch
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .devices import default_dtype
    from .engine import encode_prompt

    dtype = default_dtype(kind)  # T5_CPU keeps the accelerator's dtype, as the engine does
    target = torch.device("cpu") if t5_cpu or kind == "cpu" else torch.device(kind, 0)
    meter = _PeakMeter(target)
    err.print(
        f"Loading the tokenizer and text encoder from {model_dir} onto {target} ({dtype}) ..."
    )
    meter.reset()
    t0 = time.perf_counter()
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        encoder: Any = UMT5EncoderModel.from_pretrained(
            model_dir / "text_encoder", dtype=dtype, use_safetensors=True
        )
        encoder = encoder.to(target)
    except (OSError, ValueError) as exc:
        out.print(f"[red]T5 warm-up failed[/]: could not load the text encoder: {escape(str(exc))}")
        return False
    encoder.eval().requires_grad_(False)
    meter.sync()
    out.print(
        f"text encoder loaded in {time.perf_counter() - t0:.2f} s on {target} ({dtype}), "
        f"peak {meter.label} {_size(meter.peak())}"
    )
    runs = Table("run", "seconds", f"peak {meter.label}", title=f"T5 warm-up ({steps} encodes)")
    times = []
    for run in range(1, steps + 1):
        meter.reset()
        t0 = time.perf_counter()
        with torch.inference_mode():
            encode_prompt(tokenizer, encoder, WARMUP_PROMPT, T5_MAX_LENGTH, target)
            meter.sync()
        times.append(time.perf_counter() - t0)
        runs.add_row(str(run), f"{times[-1]:.3f}", _size(meter.peak()))
    out.print(runs)
    later = sorted(times[1:])
    steady = f"; later runs: median {later[len(later) // 2]:.3f} s" if later else ""
    out.print(f"[green]T5 warm-up OK[/]: first encode {times[0]:.3f} s{steady}")
    return True


class _PeakMeter:
    """Peak memory over a stretch of work: allocated on an accelerator, or this process's
    resident set on the CPU (its high-water mark, reset through /proc where Linux allows)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        self.backend: Any = None
        if device.type == "cuda":
            self.backend = torch.cuda
        elif device.type == "npu":
            self.backend = torch.npu  # type: ignore[attr-defined]
        self.label = f"allocated on {device}" if self.backend else "resident (process)"

    def reset(self) -> None:
        if self.backend is not None:
            self.backend.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # "5" resets VmHWM, the peak resident set
            Path("/proc/self/clear_refs").write_text("5")

    def sync(self) -> None:
        if self.backend is not None:
            self.backend.synchronize(self.device)

    def peak(self) -> int | None:
        if self.backend is not None:
            return int(self.backend.max_memory_allocated(self.device))
        return _proc_status("VmHWM")


def _memory_table(kind: str) -> Table:
    """Host RAM and every card: total, free, and what this process holds of it."""
    import resource

    import torch

    from .devices import list_devices

    table = Table(
        "memory",
        "total",
        "free",
        "this process",
        "its peak",
        title="memory",
        caption="host free: MemAvailable; a card's use: torch's reserved / allocated",
    )
    host = list_devices("cpu")[0]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    table.add_row(
        "host RAM",
        _size(host.memory_total_bytes),
        _size(host.memory_free_bytes),
        _size(_proc_status("VmRSS")),
        _size(peak_rss),
    )
    if kind != "cpu":
        backend: Any = torch.cuda if kind == "cuda" else torch.npu  # type: ignore[attr-defined]
        for d in list_devices(kind):
            table.add_row(
                f"{d.kind}:{d.index}",
                _size(d.memory_total_bytes),
                _size(d.memory_free_bytes),
                f"{_size(backend.memory_reserved(d.index))} / "
                f"{_size(backend.memory_allocated(d.index))}",
                _size(backend.max_memory_allocated(d.index)),
            )
    return table


def _proc_status(key: str) -> int | None:
    """A memory line of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _smoke(model_dir: Path, kind: str, t5_cpu: bool) -> bool:
    import time

    from PIL import Image

    from .engine import WanI2V
    from .request import Generated, GenerationRequest

    t0 = time.perf_counter()
    engine = WanI2V.load(model_dir, device=kind, t5_cpu=t5_cpu)
    loaded = time.perf_counter() - t0
    image = Image.new("RGB", (64, 64), (120, 160, 200))
    outcome = engine.generate(
        GenerationRequest(
            image=image,
            prompt="smoke test",
            width=64,
            height=64,
            num_frames=5,
            infer_steps=2,
            seed=0,
        )
    )
    total = time.perf_counter() - t0
    if isinstance(outcome, Generated):
        out.print(
            f"[green]smoke test OK[/]: loaded in {loaded:.1f} s, 5 frames at 64x64 in "
            f"{total - loaded:.1f} s"
        )
        return True
    out.print("[red]smoke test stopped early[/]")
    return False


def _size(value: int | None) -> str:
    """GiB, or MiB below one GiB (a tiny model's numbers would all read 0.0 GiB)."""
    if value is not None and value < 2**30:
        return f"{value / 2**20:.0f} MiB"
    return _gib(value)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"
