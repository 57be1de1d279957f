"""`i2v asyncapi` and `i2v schema`: print the message contract.

Owns the presentation of the contract; the content comes from `schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from i2v_fleet import schemas
from i2v_fleet.producer_sdk._extras import require_extra
from i2v_fleet.producer_sdk.settings import TopicSettings
from i2v_fleet.schemas.asyncapi import asyncapi_document

from ._common import cli_errors, out, package_version

MODELS: dict[str, type[BaseModel]] = {
    "JobRequest": schemas.JobRequest,
    "StartedEvent": schemas.StartedEvent,
    "HeartbeatEvent": schemas.HeartbeatEvent,
    "SucceededEvent": schemas.SucceededEvent,
    "FailedEvent": schemas.FailedEvent,
    "CancelledEvent": schemas.CancelledEvent,
    "RequeuedEvent": schemas.RequeuedEvent,
    "ProgressEvent": schemas.ProgressEvent,
    "CancelRequest": schemas.CancelRequest,
    "NodeInfo": schemas.NodeInfo,
}


def _dump(document: Any, fmt: str) -> str:
    if fmt == "yaml":
        require_extra("dev", ["yaml"], "YAML output")
        import yaml

        return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return json.dumps(document, indent=2, ensure_ascii=False)


@cli_errors
def asyncapi(
    fmt: Annotated[str, typer.Option("--format", help="json or yaml.")] = "json",
    partitions: Annotated[int, typer.Option(help="Partitions to document per topic.")] = 8,
    server: Annotated[str, typer.Option(help="Broker address to document.")] = "localhost:9092",
) -> None:
    """Print the AsyncAPI 3.0 document of every topic and message."""
    doc = asyncapi_document(package_version(), TopicSettings().names(), partitions, server)
    out.print(_dump(doc, fmt), markup=False)


@cli_errors
def schema(
    name: Annotated[
        str | None, typer.Argument(help=f"One of: {', '.join(MODELS)}. Omit for all.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write one <Name>.json per model here.")
    ] = None,
) -> None:
    """Print (or write) the JSON Schema of the messages."""
    if name is not None and name not in MODELS:
        raise typer.BadParameter(f"unknown message {name!r}; pick one of {', '.join(MODELS)}")
    chosen = {name: MODELS[name]} if name else MODELS
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for model_name, model in chosen.items():
            path = out_dir / f"{model_name}.json"
            path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
            out.print(str(path), markup=False)
        return
    doc = {n: m.model_json_schema() for n, m in chosen.items()}
    out.print(json.dumps(doc[name] if name else doc, indent=2), markup=False)
