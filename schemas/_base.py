"""Base model shared by every message: frozen, strict about unknown fields, versioned.

Owns the model configuration and small field types. Must never do I/O.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

if sys.version_info >= (3, 11):
    from enum import StrEnum as StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        """Backport of Python 3.11's StrEnum: members are their string values."""

        def __str__(self) -> str:
            return str(self.value)


SCHEMA_VERSION: Literal[1] = 1
"""The version of every message in this package; bumped on any breaking change."""


class Message(BaseModel):
    """Base of every message on the wire: immutable, unknown fields refused."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        use_enum_values=False,
        ser_json_timedelta="float",
        json_schema_serialization_defaults_required=False,
    )


def utcnow() -> datetime:
    """Current time, timezone-aware in UTC (naive datetimes are refused on the wire)."""
    return datetime.now(timezone.utc)


def _no_control_chars(value: str) -> str:
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value):
        raise ValueError("must not contain control characters")
    return value


SafeText = Annotated[str, AfterValidator(_no_control_chars)]
"""Free text that may travel to logs and terminals: no control characters but tab/newline."""

# Characters escaped by `safe_text`: C0/C1 controls, lone surrogates (unencodable as UTF-8),
# line and paragraph separators, and the bidirectional overrides that reorder what a
# terminal shows ("Trojan Source").
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]"
)
_ELLIPSIS = "…"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: str, limit: int) -> str:
    """`value` made fit for a `SafeText` field of at most `limit` characters, whatever it
    holds: unsafe characters escaped as `\\xNN`/`\\uNNNN`, and cut with `…` past `limit`.

    Every message built from input (a field name, a key, a value) goes through this, so
    refusing bad input can never fail on the refusal's own rules.
    """
    text = _UNSAFE.sub(_escape, value)
    if len(text) > limit:
        text = text[: max(0, limit - len(_ELLIPSIS))] + _ELLIPSIS
    return text


Timestamp = Annotated[
    AwareDatetime,
    Field(
        description="RFC 3339 timestamp with a timezone offset.", examples=["2026-01-01T12:00:00Z"]
    ),
]

SchemaVersion = Annotated[
    Literal[1],
    Field(description="Version of this message's schema.", examples=[1]),
]
