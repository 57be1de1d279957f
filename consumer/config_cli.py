"""`i2v config`: write a node's env file from a preset, and check the node's layout.

Owns the command line over `consumer.presets` and `config check`. Writing never reads the
node's environment; `config check` reads it exactly as `i2v worker` does (WorkerSettings)
and imports torch only to count the cards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .presets import DEVICES, MODEL_HEADS, NODE_CARDS, PRESETS, Preset, render

config_app = typer.Typer(
    help="A node's configuration: write an env file from a preset, check the layout.",
    invoke_without_command=True,
)

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


@config_app.callback()
def config(
    ctx: typer.Context,
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
    if ctx.invoked_subcommand is not None:
        return
    if list_presets:
        _list()
        return
    if preset is None:
        err.print(
            f"[red]error:[/] give --preset NAME ({', '.join(PRESETS)}), --list-presets, or "
            "the command check"
        )
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


ModelDir = Annotated[
    Path,
    typer.Option(
        "--model-dir",
        envvar="MODEL_CKPT_DIR",
        help="Checkpoint in the diffusers layout, for its attention heads [env: MODEL_CKPT_DIR].",
    ),
]


@config_app.command("check")
def check(
    model_dir: ModelDir = Path("/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P"),
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            envvar="DEVICE",
            callback=_device,
            help="cuda, npu or cpu (default: the first present of cuda, npu, cpu).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check the node's layout from the environment (LANES, NPROC, ULYSSES_SIZE, CFG_SIZE,
    ...) as `i2v worker` reads it, against this machine's cards and the model's heads."""
    try:
        from i2v_fleet.pipeline.devices import detect_kind
    except ImportError as exc:  # pragma: no cover - the SDK-only install
        err.print(f"[red]error:[/] config check needs the 'worker' extra ({exc})")
        raise typer.Exit(1) from None
    raise typer.Exit(0 if check_layout(model_dir, detect_kind(device)) else 1)


def check_layout(model_dir: Path, kind: str) -> bool:
    """The layout `i2v worker` would build from this environment, checked as it checks it
    (plus the card count, which the worker learns only when it splits the cards)."""
    from pydantic import ValidationError

    from i2v_fleet.pipeline.devices import device_count
    from i2v_fleet.pipeline.layout import LayoutError, lane_devices

    from .settings import WorkerSettings

    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        problem = escape(str(exc))
        out.print(
            f"[red]layout problem[/]: the node settings in the environment are invalid: {problem}"
        )
        return False
    cards = device_count(kind)
    heads, heads_from = _model_heads(model_dir)
    resolved = settings.engine_layout(cards)
    try:
        resolved.check(heads)
        if kind != "cpu":
            if resolved.nproc * settings.lanes > cards:
                per_lane = max(1, cards // settings.lanes)
                raise LayoutError(
                    f"NPROC={resolved.nproc} x LANES={settings.lanes} needs "
                    f"{resolved.nproc * settings.lanes} cards, and this node has {cards} {kind} "
                    f"cards: set NPROC={per_lane} with ULYSSES_SIZE x CFG_SIZE = {per_lane}, "
                    f"or leave NPROC and ULYSSES_SIZE unset (they follow cards / LANES)"
                )
            lane_devices(cards, settings.lanes)
    except LayoutError as exc:
        out.print(f"[red]layout problem[/]: {escape(str(exc))}")
        return False
    out.print(
        f"[green]layout OK[/]: LANES={settings.lanes} x NPROC={resolved.nproc} "
        f"(ULYSSES_SIZE={resolved.ulysses_size} x CFG_SIZE={resolved.cfg_size}), "
        f"DIT_FSDP={_onoff(resolved.dit_fsdp)} T5_FSDP={_onoff(resolved.t5_fsdp)} "
        f"T5_CPU={_onoff(resolved.t5_cpu)} VAE_PARALLEL={_onoff(resolved.vae_parallel)}; "
        f"{cards} {kind} card{'s' if cards != 1 else ''}, {heads} attention heads ({heads_from})"
    )
    return True


def _model_heads(model_dir: Path) -> tuple[int, str]:
    """The transformer's attention heads, and where the number came from."""
    config = model_dir / "transformer" / "config.json"
    try:
        heads = json.loads(config.read_text())["num_attention_heads"]  # noqa: TID251 - a config file
        return int(heads), str(config)
    except (OSError, ValueError, KeyError, TypeError):
        return MODEL_HEADS, f"assumed: no readable {config}"


def _onoff(flag: bool) -> str:
    return "true" if flag else "false"
