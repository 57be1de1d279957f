"""The engine's commands: `i2v model tiny` and `i2v doctor`."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from i2v_fleet.producer_sdk.cli import app


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
