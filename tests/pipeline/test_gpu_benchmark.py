"""`benchmarks/gpu.py --tiny`: the GPU command's own code, run on the CPU with toy sizes, so
a session lent a GPU finds it working (it has minutes of device time, not hours)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_command_runs_every_section_with_toy_sizes(tmp_path: Path) -> None:
    out = tmp_path / "gpu.txt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    for section in (
        "## attention alone",
        "fastest exact: ",
        "## DiT forward",
        "native eager float32",
        "compiled float32",
        "## job: 4 steps, guidance 5.0",
        "## turbo: 4 steps, guidance 1.0, euler",
        "compiled fp8                skipped: the device has no FP8",
        "## projected 8-card job",
    ):
        assert section in report, section
    assert "skipped: budget" not in report
