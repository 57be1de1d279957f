"""Packaging promises: the SDK stays light and the `i2v` command exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_sdk_dependencies_do_not_pull_torch() -> None:
    """Installing i2v-fleet without an extra never pulls torch, diffusers or transformers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "diffusers", "transformers", "minio"):
        assert heavy not in base
    assert {"worker", "npu", "dev", "s3"} <= set(project["optional-dependencies"])
    assert project["scripts"]["i2v"] == "i2v_fleet.producer_sdk.cli:main"


def test_importing_the_sdk_and_cli_loads_no_heavy_module() -> None:
    """Importing the SDK, the contract and the CLI leaves torch and friends unimported."""
    code = (
        "import sys, i2v_fleet.producer_sdk, i2v_fleet.schemas, i2v_fleet.producer_sdk.cli; "
        "heavy = {'torch', 'diffusers', 'transformers', 'minio', 'moto'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_i2v_command_runs() -> None:
    """The installed console script answers --version."""
    exe = Path(sys.executable).parent / "i2v"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("i2v-fleet ")
