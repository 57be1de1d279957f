"""`i2v config`: print or write a node's env file from one of the presets.

Owns the command line over `consumer.presets`. Must never import torch or read the node's
environment: it writes configuration, the worker reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .presets import DEVICES, MODEL_HEADS, NODE_CARDS, PRESETS, Preset, render

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _preset(value: str | None) -> str | None:
    if value is not None and value not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {value!r}; choose one of {', '.join(PRESETS)} (see --list-presets)"
        )
    return value


def _device(value: str | None) -> str | None:
    if value is not None and value not in DEVICES:
        raise typer.BadParameter(f"unknown device {value!r}; choose one of {', '.join(DEVICES)}")
    return value


def config(
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            callback=_preset,
            help=f"One of {', '.join(PRESETS)}.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            callback=_device,
            help="cuda, npu or cpu: also write DEVICE and that device's library variables "
            "(NCCL_*, HCCL_*, ...).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the env file here instead of stdout."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output.")] = False,
    list_presets: Annotated[
        bool, typer.Option("--list-presets", help="List the presets and what each sets.")
    ] = False,
) -> None:
    """Print a node's env file (NAME=value lines) from a preset: layout, timeouts, caches."""
    if list_presets:
        _list()
        return
    if preset is None:
        err.print(f"[red]error:[/] give --preset NAME ({', '.join(PRESETS)}) or --list-presets")
        raise typer.Exit(2)
    text = render(PRESETS[preset], device)
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.exists() and not force:
        err.print(f"[red]error:[/] {output} exists; pass --force to replace it")
        raise typer.Exit(1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    err.print(
        f"Wrote {output} (preset {preset}" + (f", device {device}" if device else "") + "). "
        f"Use it with: set -a; . {output}; set +a; i2v worker"
    )


def _list() -> None:
    out.print(f"Presets for a node of {NODE_CARDS} cards and a model of {MODEL_HEADS} heads:")
    for p in PRESETS.values():
        out.print()
        out.print(f"[bold]{p.name}[/]: {p.purpose}")
        out.print("  " + " ".join(f"{name}={value}" for name, value in p.worker.items()))
        out.print(f"  seed: {_seed(p)}")
    out.print()
    out.print(
        "The seed's MAX_CONCURRENT_TASKS becomes LANES: the seed admitted that many tasks into "
        "one process over the same cards; here Kafka holds the queue, and LANES is how many "
        "engines share the node's cards, each running one job at a time on NPROC = cards / "
        "LANES of them. One job on all 8 cards is the fastest per job, so production runs "
        "LANES=1; memory_efficient runs 2 lanes of 4 cards."
    )
    out.print(
        "--device cuda|npu|cpu adds DEVICE and that device's library variables (NCCL_* or "
        "HCCL_*/ASCEND_*, thread counts): torch reads those, the worker's settings do not."
    )


def _seed(p: Preset) -> str:
    if p.seed_concurrency is None:
        return "named without values; chosen here for quality"
    return (
        f"MAX_CONCURRENT_TASKS={p.seed_concurrency} -> LANES={p.worker['LANES']} "
        f"({p.worker['NPROC']} of the {NODE_CARDS} cards per job)"
    )
