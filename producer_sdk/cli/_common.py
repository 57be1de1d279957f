"""Shared pieces of the `i2v` commands: error display, consoles, the package version.

Owns how failures are shown to a person: one red line that says what to do next.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from i2v_fleet.producer_sdk.errors import I2VError

P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
"""Results go to stdout, so they can be piped or eval'ed."""

err = Console(stderr=True, highlight=False, soft_wrap=True)
"""Progress and problems go to stderr."""


def package_version() -> str:
    try:
        return version("i2v-fleet")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def cli_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Show our errors as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except I2VError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True)
            raise typer.Exit(1) from None

    return wrapper
