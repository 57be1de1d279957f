"""Check for optional extras before importing them, so users get a one-line hint.

Owns the mapping of features to extras. Must never import the extras themselves.
"""

from __future__ import annotations

import importlib.util

from .errors import MissingExtra


def require_extra(extra: str, modules: list[str], feature: str) -> None:
    """Raise `MissingExtra` naming `extra` when any of `modules` cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(extra, missing, feature)
