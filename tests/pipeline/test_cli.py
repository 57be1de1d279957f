"""The engine's commands: `i2v model tiny` and `i2v doctor`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer_sdk.cli import app


def test_model_tiny_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """`i2v model tiny --out DIR` writes a directory that `i2v doctor` accepts."""
    runner = CliRunner()
    result = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    doctor = runner.invoke(app, ["doctor", "--model-dir", str(tmp_path / "m")])
    assert doctor.exit_code == 0, doctor.output
    assert "model directory OK" in doctor.stdout


def test_doctor_reports_versions_devices_and_a_bad_model_dir(tmp_path: Path) -> None:
    """`i2v doctor` lists versions and devices, and fails naming the model problem."""
    result = CliRunner().invoke(app, ["doctor"], env={"MODEL_CKPT_DIR": str(tmp_path)})
    assert result.exit_code == 1
    for words in ("torch", "diffusers", "transformers", "torch_npu", "cpu:0", "no transformer/"):
        assert words in result.stdout, words


def test_doctor_smoke_runs_a_generation(tiny_model_dir: Path) -> None:
    """`i2v doctor --smoke` loads the model and generates a few frames."""
    result = CliRunner().invoke(app, ["doctor", "--smoke", "--model-dir", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "smoke test OK" in result.stdout


def test_doctor_t5_warmup_times_each_encode_and_reports_memory(tiny_model_dir: Path) -> None:
    """`--t5-warmup --warmup-steps 2` loads only the text encoder and prints two timed runs."""
    args = ["doctor", "--model-dir", str(tiny_model_dir), "--t5-warmup", "--warmup-steps", "2"]
    result = CliRunner().invoke(app, args, env={"DEVICE": "cpu", "T5_CPU": "false"})
    assert result.exit_code == 0, result.output
    assert "T5 warm-up OK" in result.stdout
    runs = [line for line in result.stdout.splitlines() if re.match(r"│ [12]\s+│ \d+\.\d{3}", line)]
    assert len(runs) == 2, result.stdout
    for words in ("memory", "host RAM", "this process", "its peak", "GiB"):
        assert words in result.stdout, words


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


def test_doctor_layout_refuses_what_the_worker_would_and_names_a_fix(
    forty_heads: Path,
) -> None:
    """`--layout` with NPROC=4 ULYSSES_SIZE=4 CFG_SIZE=2 fails with the suggestion, exit 1."""
    env = {**LAYOUT_ENV, "NPROC": "4", "ULYSSES_SIZE": "4", "CFG_SIZE": "2"}
    args = ["doctor", "--model-dir", str(forty_heads), "--layout"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1, result.output
    text = " ".join(result.stdout.split())
    assert "ULYSSES_SIZE x CFG_SIZE must equal NPROC: 4 x 2 != 4" in text
    assert "use ULYSSES_SIZE=4 CFG_SIZE=1 or ULYSSES_SIZE=2 CFG_SIZE=2" in text


def test_doctor_layout_accepts_a_layout_that_runs(forty_heads: Path) -> None:
    """`--layout` with NPROC=4 ULYSSES_SIZE=2 CFG_SIZE=2 prints the resolved layout, exit 0."""
    env = {**LAYOUT_ENV, "NPROC": "4", "ULYSSES_SIZE": "2", "CFG_SIZE": "2"}
    args = ["doctor", "--model-dir", str(forty_heads), "--layout"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "layout OK: LANES=1 x NPROC=4 (ULYSSES_SIZE=2 x CFG_SIZE=2)" in result.stdout


def test_layout_check_refuses_more_ranks_than_cards(
    forty_heads: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On cuda/npu, NPROC x LANES beyond the node's cards is refused naming an NPROC that fits."""
    import pipeline.devices
    from pipeline.cli import _check_layout

    monkeypatch.setattr(pipeline.devices, "device_count", lambda kind: 8)
    for key, value in {"LANES": "2", "NPROC": "8", "ULYSSES_SIZE": "4", "CFG_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DEVICE", raising=False)
    assert not _check_layout(forty_heads, "cuda")
    refusal = " ".join(capsys.readouterr().out.split())
    assert "NPROC=8 x LANES=2 needs 16 cards, and this node has 8 cuda cards" in refusal
    assert "set NPROC=4 with ULYSSES_SIZE x CFG_SIZE = 4" in refusal
    monkeypatch.setenv("NPROC", "4")
    monkeypatch.setenv("CFG_SIZE", "1")
    assert _check_layout(forty_heads, "cuda")
