"""`i2v config`: every preset renders an env file that a worker loads and can run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from consumer.presets import MODEL_HEADS, NODE_CARDS, PRESETS, parse_env, worker_env
from consumer.settings import WorkerSettings
from producer_sdk.cli import app

WORKER_FIELDS = {name.upper() for name in WorkerSettings.model_fields}


def _config(*args: str) -> str:
    result = CliRunner().invoke(app, ["config", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("device", [None, "cuda", "npu", "cpu"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads_into_worker_settings_and_fits_an_8_card_node(
    name: str, device: str | None
) -> None:
    """Each preset's file parses as NAME=value, loads into WorkerSettings, and its layout
    runs a 40-head model on 8 cards with NPROC x LANES within the cards."""
    args = ["--preset", name] + (["--device", device] if device else [])
    text = _config(*args)
    assert text.startswith(f"# i2v-fleet node configuration: preset {name}")
    env = parse_env(text)
    worker = {k: v for k, v in env.items() if k in WORKER_FIELDS}
    assert worker == worker_env(PRESETS[name], device)
    settings = WorkerSettings.model_validate({k.lower(): v for k, v in worker.items()})
    layout = settings.engine_layout(NODE_CARDS)
    layout.check(MODEL_HEADS)
    assert layout.ulysses_size * layout.cfg_size == layout.nproc
    assert layout.nproc * settings.lanes <= NODE_CARDS
    assert settings.device == device
    libraries = set(env) - WORKER_FIELDS
    if device == "npu":
        assert {"HCCL_TIMEOUT", "ASCEND_RT_VISIBLE_DEVICES"} <= libraries
    if device == "cuda":
        assert {"NCCL_DEBUG", "CUDA_VISIBLE_DEVICES"} <= libraries
    if device is None:
        assert not libraries, "library variables only with --device"
    assert not any(k.startswith(("NCCL_", "CUDA_")) for k in env) or device == "cuda"
    assert not any(k.startswith(("HCCL_", "ASCEND_")) for k in env) or device == "npu"


def test_presets_keep_the_seed_intent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file loads through the environment too, with the seed's choices per preset."""

    def load(name: str) -> WorkerSettings:
        for key, value in parse_env(_config("--preset", name)).items():
            monkeypatch.setenv(key, value)
        return WorkerSettings()

    production = load("production")
    assert (production.lanes, production.use_attention_cache, production.t5_cpu) == (1, True, False)
    memory = load("memory_efficient")
    assert (memory.lanes, memory.engine_layout(NODE_CARDS).nproc, memory.t5_cpu) == (2, 4, True)
    quality = load("high_quality")
    assert not quality.use_attention_cache
    assert not quality.t5_cpu
    assert quality.task_timeout > production.task_timeout
    debug = load("debug")
    assert debug.task_timeout == 7200
    assert "CUDA_LAUNCH_BLOCKING=1" in _config("--preset", "debug", "--device", "cuda")
    assert "ASCEND_LAUNCH_BLOCKING=1" in _config("--preset", "debug", "--device", "npu")


def test_list_presets_names_each_and_the_lanes_mapping() -> None:
    """`--list-presets` lists every preset and says how MAX_CONCURRENT_TASKS maps to LANES."""
    text = _config("--list-presets")
    for name in PRESETS:
        assert f"{name}:" in text
    assert "MAX_CONCURRENT_TASKS=5 -> LANES=1" in text
    assert "fastest per job" in text


def test_output_writes_the_file_and_keeps_an_existing_one(tmp_path: Path) -> None:
    """`--output` writes the same text as stdout and replaces a file only with --force."""
    target = tmp_path / "node.env"
    runner = CliRunner()
    result = runner.invoke(app, ["config", "--preset", "production", "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text() == _config("--preset", "production")
    again = runner.invoke(app, ["config", "--preset", "debug", "--output", str(target)])
    assert again.exit_code == 1
    assert "--force" in again.stderr
    forced = ["config", "--preset", "debug", "--output", str(target), "--force"]
    assert runner.invoke(app, forced).exit_code == 0
    assert "preset debug" in target.read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--preset", "turbo"], "unknown preset 'turbo'"),
        (["--preset", "production", "--device", "tpu"], "unknown device 'tpu'"),
        ([], "give --preset NAME"),
    ],
)
def test_a_bad_or_missing_choice_is_a_usage_error(args: list[str], words: str) -> None:
    """An unknown preset or device, or none at all, exits 2 naming the choices."""
    result = CliRunner().invoke(app, ["config", *args])
    assert result.exit_code == 2
    message = " ".join(result.stderr.replace("│", " ").split())  # unwrap rich's error box
    assert words in message
    assert "development" in message or "cuda" in message
