"""The `i2v` command: the client side of the fleet, the contract, and the local stack.

Owns the command tree. Commands import heavy or optional packages only when they run, so
`i2v --help` works with the SDK alone and a missing extra gets a one-line hint.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import contract, dev, topics
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
app.command("asyncapi")(contract.asyncapi)
app.command("schema")(contract.schema)


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
