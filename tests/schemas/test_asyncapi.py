"""The AsyncAPI document: parses, every $ref resolves, and it agrees with the models."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from i2v_fleet.producer_sdk.cli import app
from i2v_fleet.schemas import JobRequest, TopicNames
from i2v_fleet.schemas.asyncapi import asyncapi_document


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external or malformed $ref {ref!r}"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as `i2v asyncapi --format yaml` prints it, parsed back."""
    result = CliRunner().invoke(app, ["asyncapi", "--format", "yaml"])
    assert result.exit_code == 0, result.output
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def test_cli_prints_asyncapi_3_with_all_six_topics(document: dict[str, Any]) -> None:
    """`i2v asyncapi` prints an AsyncAPI 3.0 document naming every topic of the contract."""
    assert document["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == set(TopicNames().model_dump().values())


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    """No $ref in the document dangles."""
    refs = _refs(document)
    assert len(refs) > 50
    for ref in refs:
        assert _resolve(document, ref) is not None


def test_operations_use_their_channels_messages(document: dict[str, Any]) -> None:
    """Each operation's messages belong to the channel it names (an AsyncAPI 3 rule)."""
    for name, op in document["operations"].items():
        channel = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), name


def test_messages_document_keys_and_headers(document: dict[str, Any]) -> None:
    """Every message states its Kafka key and its headers."""
    for name, message in document["components"]["messages"].items():
        assert message["bindings"]["kafka"]["key"]["type"] == "string", name
        assert message["headers"]["properties"], name
    dlq = document["components"]["messages"]["DeadLetter"]
    assert "i2v-error-code" in dlq["headers"]["properties"]
    status = document["components"]["messages"]["StartedEvent"]
    assert "i2v-event-type" in status["headers"]["properties"]


def test_payload_schemas_are_valid_and_match_the_models(document: dict[str, Any]) -> None:
    """The exported schemas are valid JSON Schema and accept what the models produce."""
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    request = JobRequest(job_id=uuid.uuid4(), prompt="p", image={"url": "https://a.io/x.jpg"})
    root = {**document["components"]["schemas"]["JobRequest"], "components": document["components"]}
    jsonschema.validate(json.loads(request.model_dump_json()), root)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(request.model_dump_json()), "num_frames": 500}, root)


def test_topic_names_follow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """I2V_TOPIC_* renames the channels in the printed document."""
    monkeypatch.setenv("I2V_TOPIC_REQUESTS", "tenant-a.requests")
    result = CliRunner().invoke(app, ["asyncapi"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["channels"]["requests"]["address"] == "tenant-a.requests"


def test_document_builds_without_the_cli() -> None:
    """The builder is usable as a library call with custom names and partitions."""
    doc = asyncapi_document("9.9.9", TopicNames().with_suffix(".x"), partitions=3)
    assert doc["info"]["version"] == "9.9.9"
    assert doc["channels"]["status"]["bindings"]["kafka"]["partitions"] == 3
    assert doc["channels"]["control"]["bindings"]["kafka"]["topicConfiguration"][
        "cleanup.policy"
    ] == ["compact", "delete"]
