"""The built wheel, installed SDK-only into a fresh venv beside an app with generic module names.

The venv gets our wheel (with its `i2v` script) and, read-only, exactly the distributions
its base requirements pull in, taken from the test environment: what `pip install i2v-fleet`
would install, without a package index.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

APP_MAIN = """
import asyncio

import schemas  # the app's own modules, not ours
import consumer
import pipeline

from i2v_fleet import AsyncClient, Client, JobRequest
from i2v_fleet.producer_sdk.testing import FakeWorker, MemoryTransport
from i2v_fleet.schemas import ProgressEvent

assert schemas.MINE == "app schemas" and consumer.MINE == "app consumer"
assert pipeline.MINE == "app pipeline"


async def main() -> None:
    transport = MemoryTransport()
    async with AsyncClient(transport=transport) as client, FakeWorker(transport):
        job = await client.submit(b"\\xff\\xd8\\xff fake jpeg", prompt="the cat yawns",
                                  quality_preset="fast")
        seen = [type(event).__name__ async for event in client.watch(job.job_id)]
        result = await client.wait(job.job_id)
        print("events", " ".join(seen))
        print("url", result.url)


asyncio.run(main())
print("request", JobRequest.__module__, Client.__name__, ProgressEvent.__name__)
"""


def _documented_sdk_imports() -> set[str]:
    """Every `from i2v_fleet... import ...` the README, docs and examples show a user,
    except the node's and the engine's (they need the worker extra)."""
    sources = [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        ROOT / "producer_sdk" / "testing.py",
    ]
    sources += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "examples").glob("*.py"))
    found = set()
    for source in sources:
        for line in source.read_text().splitlines():
            line = line.strip()
            if re.fullmatch(r"from i2v_fleet(\.[a-z_.]+)? import [A-Za-z_, ]+", line) and not (
                ".consumer" in line or ".pipeline" in line
            ):
                found.add(line)
    return found


def _requirement_closure(name: str) -> set[str]:
    """The installed distributions that `name`'s base requirements pull in, recursively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        for req in dist.requires or []:
            if ";" in req and "extra ==" in req.split(";", 1)[1]:
                continue
            marker = req.split(";", 1)[1].strip() if ";" in req else ""
            if marker and not _marker_holds(marker):
                continue
            dep = re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0]
            key = dep.lower().replace("_", "-")
            if key not in seen:
                seen.add(key)
                todo.append(dep)
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def _link_distributions(names: set[str], into: Path) -> None:
    """Symlink each distribution's top-level modules and metadata into `into`."""
    into.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = base / top
            target = into / top
            if source.exists() and not target.exists() and not top.endswith(".pth"):
                target.symlink_to(source)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdk_wheel_beside_an_app_with_generic_names(tmp_path: Path) -> None:
    """The wheel installs one top-level name; the README's SDK example runs beside an app's
    own `schemas.py`, `consumer/` and `pipeline.py`, which keep their meaning."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "tests", "*.egg-info", "build", "dist"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("i2v_fleet-*.whl")
    listing = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    tops = {line.split("/")[0].split()[0] for line in listing.splitlines()[1:] if line.strip()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"i2v_fleet"}

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    deps = tmp_path / "deps"
    _link_distributions(_requirement_closure("i2v-fleet"), deps)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "sdk-deps.pth").write_text(f"{deps}\n")

    app = tmp_path / "app"
    (app / "consumer").mkdir(parents=True)
    (app / "schemas.py").write_text('MINE = "app schemas"\n')
    (app / "consumer" / "__init__.py").write_text('MINE = "app consumer"\n')
    (app / "pipeline.py").write_text('MINE = "app pipeline"\n')
    (app / "main.py").write_text(textwrap.dedent(APP_MAIN))
    run = subprocess.run(
        [str(python), "main.py"], cwd=app, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "events StartedEvent" in run.stdout
    assert "SucceededEvent" in run.stdout
    assert "url http" in run.stdout
    assert "request i2v_fleet.schemas.requests Client ProgressEvent" in run.stdout

    heavy = subprocess.run(
        [str(python), "-c", "import torch"], cwd=app, capture_output=True, text=True
    )
    assert heavy.returncode != 0, "the SDK-only install must not reach torch"
    imports = sorted(_documented_sdk_imports())
    assert len(imports) >= 5, imports
    documented = subprocess.run(
        [str(python), "-c", "\n".join(imports)], cwd=app, capture_output=True, text=True
    )
    assert documented.returncode == 0, documented.stderr
    for args in (["--version"], ["submit", "--help"], ["asyncapi", "--help"], ["dev", "--help"]):
        cli = subprocess.run(
            [str(env_dir / "bin" / "i2v"), *args], cwd=app, capture_output=True, text=True
        )
        assert cli.returncode == 0, (args, cli.stdout, cli.stderr)
