"""`i2v dev up|status|down|env`: the local broker and object store for development.

Owns the command line of the local stack and what it tells about where the data lives; the
work is in `producer_sdk.devstack`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig, default_state_dir

from ._common import cli_errors, err, out

app = typer.Typer(
    help="Run a local Kafka-compatible broker (Tansu) and S3 server (moto) on loopback.",
    no_args_is_help=True,
)

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help=(
            "Where pid files and logs live "
            "[default: $I2V_DEV_HOME or ~/.local/state/i2v-fleet/dev]."
        ),
        show_default=False,
    ),
]
KafkaPort = Annotated[int, typer.Option(help="Broker port on 127.0.0.1.")]
S3Port = Annotated[int, typer.Option(help="S3 port on 127.0.0.1.")]


def _stack(
    state_dir: Path | None,
    kafka_port: int,
    s3_port: int,
    partitions: int = 8,
    durable: bool = False,
) -> DevStack:
    return DevStack(
        StackConfig(
            state_dir=state_dir or default_state_dir(),
            kafka_port=kafka_port,
            s3_port=s3_port,
            partitions=partitions,
            durable=durable,
        )
    )


def _exports(stack: DevStack) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in stack.config.env().items())


@app.command()
@cli_errors
def up(
    state_dir: StateDir = None,  # type: ignore[assignment]
    kafka_port: KafkaPort = 9092,
    s3_port: S3Port = 9000,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 8,
    durable: Annotated[
        bool,
        typer.Option(
            "--durable",
            help=(
                "Keep the broker's log in a bucket of the local S3 server, not in the "
                "broker's memory: topics, records and committed offsets survive a broker "
                "restart (not `i2v dev down`, which stops the S3 server)."
            ),
        ),
    ] = False,
) -> None:
    """Start the stack (harmless when it runs), create topics and buckets, print exports.

    The export lines go to stdout: `eval "$(i2v dev up)"` points this shell at the stack.
    """
    stack = _stack(state_dir, kafka_port, s3_port, partitions, durable)
    c = stack.config
    err.print(f"Starting the local stack in {c.state_dir} ...")
    services, created = stack.up()
    for s in services:
        err.print(f"  {s.name:<7} {s.action:<8} {s.endpoint}  (pid {s.pid}, log {s.log})")
    new = sorted(k for k, v in created.items() if v == "created")
    kept = (
        f"broker log in {c.storage} on the S3 server: it survives broker restarts and "
        "`i2v dev down --keep-s3`, not `i2v dev down`"
        if c.durable
        else "memory storage: a broker restart empties it"
    )
    err.print(
        f"  topics and buckets: {len(new)} created, {len(created) - len(new)} already there "
        f"({c.partitions} partitions; {kept})"
    )
    out.print(_exports(stack), markup=False)


@app.command()
@cli_errors
def status(
    state_dir: StateDir = None,  # type: ignore[assignment]
    kafka_port: KafkaPort = 9092,
    s3_port: S3Port = 9000,
) -> None:
    """Show whether the broker and the object store run and answer, and where each keeps
    its data (exit 1 if one does not run or answer)."""
    stack = _stack(state_dir, kafka_port, s3_port)
    table = Table("service", "endpoint", "pid", "answering", "storage", "log")
    services = stack.status()
    for s in services:
        table.add_row(
            s.name,
            s.endpoint,
            str(s.pid or "-"),
            "yes" if s.answering else "no",
            s.storage,
            str(s.log),
        )
    out.print(table)
    if not all(s.healthy for s in services):
        durable = " --durable" if stack.running_config().durable else ""
        err.print(f"The stack is not (fully) running: `i2v dev up{durable}` starts it.")
        raise typer.Exit(1)


@app.command()
@cli_errors
def down(
    state_dir: StateDir = None,  # type: ignore[assignment]
    kafka_port: KafkaPort = 9092,
    s3_port: S3Port = 9000,
    keep_s3: Annotated[
        bool,
        typer.Option(
            "--keep-s3",
            help=(
                "Stop only the broker: the S3 server keeps running with its objects, a "
                "durable broker's log included; `i2v dev up --durable` resumes from it."
            ),
        ),
    ] = False,
) -> None:
    """Stop the broker and the object store. All their data is gone: the S3 server keeps
    objects in memory, so this also empties a durable broker's log (it is the reset)."""
    stack = _stack(state_dir, kafka_port, s3_port)
    for name, was_running in stack.down(keep_s3=keep_s3).items():
        err.print(f"  {name:<7} {'stopped' if was_running else 'was not running'}")
    if keep_s3 and stack.s3.pid() is not None:
        err.print("  s3      kept running: its objects and a durable broker's log stay")
    elif keep_s3:
        err.print("  s3      was not running")


@app.command()
@cli_errors
def env(
    state_dir: StateDir = None,  # type: ignore[assignment]
    kafka_port: KafkaPort = 9092,
    s3_port: S3Port = 9000,
) -> None:
    """Print the export lines for the stack without starting anything."""
    out.print(_exports(_stack(state_dir, kafka_port, s3_port)), markup=False)
