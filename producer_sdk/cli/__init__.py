"""The `i2v` command: the client side of the fleet, the contract, and the local stack.

Owns the command tree. Commands import heavy or optional packages only when they run, so
`i2v --help` works with the SDK alone and a missing extra gets a one-line hint.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Annotated

import typer

from . import bench, contract, dev, jobs, monitor, topics
from ._common import out, package_version

app = typer.Typer(
    name="i2v",
    help="i2v-fleet: image-to-video jobs over Kafka. Submit, follow, operate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(dev.app, name="dev")
app.add_typer(topics.app, name="topics")
app.command("submit")(jobs.submit)
app.command("watch")(jobs.watch_)
app.command("status")(jobs.status)
app.command("cancel")(jobs.cancel)
app.command("nodes")(jobs.nodes)
app.command("queue")(jobs.queue)
app.command("bench")(bench.bench)
app.command("monitor")(monitor.monitor)
app.command("asyncapi")(contract.asyncapi)
app.command("schema")(contract.schema)


def _add_plugins() -> None:
    """Add the commands other packages register under the `i2v.commands` entry point.

    The node and engine commands live with the code they run; this package never imports
    them by name. Each plugin imports its heavy dependencies only when run.
    """
    for ep in entry_points(group="i2v.commands"):
        try:
            command = ep.load()
        except ImportError as exc:  # a broken install: say so, keep the rest working
            out.print(f"i2v: command {ep.name!r} unavailable ({exc})", style="red")
            continue
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=ep.name)
        else:
            app.command(ep.name)(command)


_add_plugins()


def _version(value: bool) -> None:
    if value:
        out.print(f"i2v-fleet {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """i2v-fleet: image-to-video jobs over Kafka."""


def main() -> None:
    app()


__all__ = ["app", "main"]
