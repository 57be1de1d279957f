"""The dependency rule between our packages (docs/LAYOUT.md), read from every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "producer_sdk", "consumer", "pipeline")
CONNECTION = ROOT / "i2v_fleet" / "connection.py"
"""The module `i2v_fleet.connection`, a package of its own for the rule."""
ALLOWED = {
    "schemas": set(),
    "producer_sdk": {"schemas", "connection"},
    "consumer": {"schemas", "pipeline", "connection"},
    "pipeline": set(),
    "connection": {"schemas"},
}
CONNECTION_THIRD_PARTY = {"pydantic", "pydantic_settings"}


def _package_of(path: Path, package: str) -> list[str]:
    """The dotted parts of the package a module lives in (its own, for an `__init__`)."""
    return [package, *path.relative_to(ROOT / package).parent.parts]


def _imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in `source`, relative ones resolved and
    `from i2v_fleet import x` read as `i2v_fleet.x`; imports inside functions included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(["i2v_fleet", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "i2v_fleet":
                found += [(node.lineno, f"i2v_fleet.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _modules() -> list[tuple[str, Path]]:
    modules = [(p, f) for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))]
    return [*modules, ("connection", CONNECTION)]


def _module_imports(package: str, path: Path) -> list[tuple[int, str]]:
    # i2v_fleet.connection sits in the i2v_fleet folder itself: its relative imports start there.
    where = [] if package == "connection" else _package_of(path, package)
    return _imports(path.read_text(), where)


@pytest.mark.parametrize("package", [*PACKAGES, "connection"])
def test_packages_import_only_what_the_rule_allows(package: str) -> None:
    """Each package imports only the packages of ours the rule allows it, always through the
    `i2v_fleet.` name (a bare `schemas` exists only in a checkout, never in an install)."""
    broken = []
    for _, path in [m for m in _modules() if m[0] == package]:
        for line, module in _module_imports(package, path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top in PACKAGES:
                broken.append(f"{where} (write i2v_fleet.{module})")
            elif top == "i2v_fleet":
                target = module.split(".")[1] if "." in module else ""
                if target != package and target not in ALLOWED[package]:
                    broken.append(f"{where} ({package} may import {sorted(ALLOWED[package])})")
    assert not broken, "\n".join(broken)


def test_connection_imports_only_pydantic_and_the_standard_library() -> None:
    """`i2v_fleet.connection` is read by the light SDK and by the node alike: besides the
    contract it may import only pydantic, pydantic-settings and the standard library, never
    a client library (aiokafka, minio) or torch, not even inside a function."""
    broken = []
    for line, module in _module_imports("connection", CONNECTION):
        top = module.split(".")[0]
        if top == "i2v_fleet":
            continue  # our own packages: the rule above
        if top not in CONNECTION_THIRD_PARTY and top not in sys.stdlib_module_names:
            broken.append(f"i2v_fleet/connection.py:{line} imports {module}")
    assert not broken, "\n".join(broken)


def test_the_rule_reads_relative_and_function_level_imports() -> None:
    """The reader resolves relative imports and sees those inside functions."""
    source = (
        "from . import a\nfrom ..schemas import b\nfrom i2v_fleet import pipeline\n"
        "def f():\n    import schemas.x\n"
    )
    assert [m for _, m in _imports(source, ["consumer", "engine"])] == [
        "i2v_fleet.consumer.engine",
        "i2v_fleet.consumer.schemas",
        "i2v_fleet.pipeline",
        "schemas.x",
    ]
