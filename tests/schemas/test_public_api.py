"""The packages' public surface: `__all__` is sorted, complete and importable."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["i2v_fleet", "i2v_fleet.schemas", "i2v_fleet.producer_sdk"])
def test_all_is_sorted_and_importable(package: str) -> None:
    """Everything in `__all__` exists, and the list is kept in a stable order."""
    module = importlib.import_module(package)
    exported = list(module.__all__)
    upper = [n for n in exported if n.isupper()]
    rest = [n for n in exported if not n.isupper()]
    assert upper == sorted(upper)
    assert rest == sorted(rest, key=lambda n: (n[0].islower(), n))
    for name in exported:
        assert hasattr(module, name), name


def test_public_names_are_all_exported() -> None:
    """Every public name bound in `schemas` is in `__all__` (nothing public by accident)."""
    from i2v_fleet import schemas

    public = {
        n
        for n, v in vars(schemas).items()
        if not n.startswith("_") and not isinstance(v, type(importlib)) and n != "annotations"
    }
    assert public - {"TypeAdapter"} == set(schemas.__all__)


def test_schemas_imports_only_pydantic() -> None:
    """The contract package depends on pydantic alone (it ships with the light SDK)."""
    import ast
    from pathlib import Path

    from i2v_fleet import schemas

    allowed = {"pydantic", "__future__"}
    for path in Path(schemas.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                root = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                root = node.names[0].name.split(".")[0]
            else:
                continue
            assert root in allowed or root in _stdlib(), f"{path.name} imports {root}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names)
