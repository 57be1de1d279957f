"""`i2v topics`: create and list the contract's topics on any Kafka cluster.

Owns the command line of topic administration; the work is in `producer_sdk.admin`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from i2v_fleet.producer_sdk.admin import create_topics, list_topics
from i2v_fleet.producer_sdk.settings import KafkaSettings, TopicSettings
from i2v_fleet.schemas import topic_specs

from ._common import cli_errors, err, out

app = typer.Typer(help="Create or list the i2v topics on a Kafka cluster.", no_args_is_help=True)


def _parse_config(items: list[str]) -> dict[str, str]:
    config: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--config takes key=value; got {item!r}")
        config[key.strip()] = value.strip()
    return config


@app.command("create")
@cli_errors
def create(
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 8,
    replication_factor: Annotated[
        int | None,
        typer.Option(min=1, help="Replicas per partition [default: min(3, brokers)]."),
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", help="Extra topic setting key=value, e.g. min.insync.replicas=2."),
    ] = None,
) -> None:
    """Create every topic with its cleanup and retention settings; existing ones are kept."""
    kafka = KafkaSettings()
    specs = topic_specs(TopicSettings().names(), partitions)
    err.print(f"Creating {len(specs)} topics on {kafka.bootstrap_servers} ...")
    outcomes = asyncio.run(
        create_topics(
            kafka,
            specs,
            replication_factor=replication_factor,
            extra_config=_parse_config(config or []),
        )
    )
    table = Table("topic", "partitions", "settings", "outcome")
    for spec in specs:
        settings = ", ".join(f"{k}={v}" for k, v in spec.config.items())
        table.add_row(spec.name, str(spec.partitions), settings, outcomes[spec.name].value)
    out.print(table)


@app.command("list")
@cli_errors
def list_() -> None:
    """List the topics on the cluster."""
    for name in asyncio.run(list_topics(KafkaSettings())):
        out.print(name, markup=False)
