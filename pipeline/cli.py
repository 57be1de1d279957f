"""`i2v model tiny` and `i2v doctor`: the engine's commands.

Owns their command line. Imports torch and diffusers only inside the commands, so the
`i2v` command starts fast and says which extra to install when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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


def doctor(
    model_dir: ModelDir = Path("/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P"),
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Also load the model and run one tiny generation.")
    ] = False,
) -> None:
    """Check this machine: devices and memory, library versions, and the model directory."""
    require_worker_extra("i2v doctor")
    import diffusers
    import torch
    import transformers

    from .devices import detect_kind, list_devices, npu_available
    from .errors import PipelineError
    from .loading import check_checkpoint

    kind = detect_kind()
    versions = Table("component", "version", title="software")
    versions.add_row("python", platform.python_version())
    versions.add_row("torch", torch.__version__)
    versions.add_row("diffusers", diffusers.__version__)
    versions.add_row("transformers", transformers.__version__)
    versions.add_row("cuda (torch build)", str(torch.version.cuda or "-"))
    npu_spec = importlib.util.find_spec("torch_npu") is not None
    versions.add_row("torch_npu", "importable" if npu_spec else "not installed")
    out.print(versions)

    devices = Table("device", "name", "memory total", "memory free", title=f"devices ({kind})")
    for d in list_devices(kind):
        devices.add_row(
            f"{d.kind}:{d.index}", d.name, _gib(d.memory_total_bytes), _gib(d.memory_free_bytes)
        )
    out.print(devices)
    if kind == "cpu":
        out.print("No CUDA GPU or Ascend NPU found: the engine will run on the CPU (slow).")
    elif kind == "npu" and not npu_available():  # pragma: no cover - defensive
        out.print("torch_npu is installed but sees no NPU.")

    ok = True
    try:
        check_checkpoint(model_dir)
        out.print(f"[green]model directory OK[/]: {model_dir}")
    except PipelineError as exc:
        ok = False
        out.print(f"[red]model directory problem[/]: {exc}")
    if ok and smoke:
        ok = _smoke(model_dir)
    raise typer.Exit(0 if ok else 1)


def _smoke(model_dir: Path) -> bool:
    import time

    from PIL import Image

    from .engine import WanI2V
    from .request import Generated, GenerationRequest

    t0 = time.perf_counter()
    engine = WanI2V.load(model_dir, t5_cpu=os.environ.get("T5_CPU", "").lower() == "true")
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


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"
