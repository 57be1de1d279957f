"""`i2v config`: every preset renders an env file that a worker loads and can run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from i2v_fleet.consumer.presets import MODEL_HEADS, NODE_CARDS, PRESETS, parse_env, worker_env
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.producer_sdk.cli import app

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


LAYOUT_ENV = {"DEVICE": "cpu", "LANES": "1", "T5_CPU": "false", "T5_FSDP": "false"}


@pytest.fixture
def forty_heads(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's directory with the 14B's head count in its transformer config."""
    import json
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config_path = model / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_attention_heads": 40}))
    return model


def test_config_check_refuses_what_the_worker_would_and_names_a_fix(
    forty_heads: Path,
) -> None:
    """`config check` with NPROC=4 ULYSSES_SIZE=4 CFG_SIZE=2 fails naming a fix, exit 1."""
    env = {**LAYOUT_ENV, "NPROC": "4", "ULYSSES_SIZE": "4", "CFG_SIZE": "2"}
    args = ["config", "check", "--model-dir", str(forty_heads)]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1, result.output
    text = " ".join(result.stdout.split())
    assert "ULYSSES_SIZE x CFG_SIZE must equal NPROC: 4 x 2 != 4" in text
    assert "use ULYSSES_SIZE=4 CFG_SIZE=1 or ULYSSES_SIZE=2 CFG_SIZE=2" in text


def test_config_check_accepts_a_layout_that_runs(forty_heads: Path) -> None:
    """`config check` with NPROC=4 ULYSSES_SIZE=2 CFG_SIZE=2 prints the layout, exit 0."""
    env = {**LAYOUT_ENV, "NPROC": "4", "ULYSSES_SIZE": "2", "CFG_SIZE": "2"}
    args = ["config", "check", "--model-dir", str(forty_heads)]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "layout OK: LANES=1 x NPROC=4 (ULYSSES_SIZE=2 x CFG_SIZE=2)" in result.stdout


def test_layout_check_refuses_more_ranks_than_cards(
    forty_heads: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On cuda/npu, NPROC x LANES beyond the node's cards is refused naming an NPROC that fits."""
    import i2v_fleet.pipeline.devices as devices
    from i2v_fleet.consumer.config_cli import check_layout

    monkeypatch.setattr(devices, "device_count", lambda kind: 8)
    for key, value in {"LANES": "2", "NPROC": "8", "ULYSSES_SIZE": "4", "CFG_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DEVICE", raising=False)
    assert not check_layout(forty_heads, "cuda")
    refusal = " ".join(capsys.readouterr().out.split())
    assert "NPROC=8 x LANES=2 needs 16 cards, and this node has 8 cuda cards" in refusal
    assert "set NPROC=4 with ULYSSES_SIZE x CFG_SIZE = 4" in refusal
    monkeypatch.setenv("NPROC", "4")
    monkeypatch.setenv("CFG_SIZE", "1")
    assert check_layout(forty_heads, "cuda")
