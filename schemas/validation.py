"""Turn pydantic's validation errors into one stable, human line that names the field.

Owns the wording of `invalid_request` messages. Must never echo the offending input, and
must always return text that fits an `ErrorInfo` message, whatever the input held.
"""

from __future__ import annotations

from pydantic import ValidationError

from ._base import safe_text
from .errors import MAX_ERROR_MESSAGE_CHARS

_TAGS = {"url", "s3", "base64", "attention", "first_block", "none"}
_LOC_PART_CHARS = 64
"""A field name or map key is quoted up to this many characters (they come from input)."""
_MSG_CHARS = 300


def describe_validation_error(exc: ValidationError, *, limit: int = 5) -> str:
    """`field: what is wrong` for each error, joined with `; `; input values are never echoed.

    Field names and keys come from the record, so each is escaped and cut, and the whole
    line is cut to the length an `ErrorInfo` message may have.
    """
    parts: list[str] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [safe_text(str(p), _LOC_PART_CHARS) for p in err["loc"]]
        # Tagged unions add the tag to the path (image.url.url): drop it, it repeats.
        loc = [p for i, p in enumerate(loc) if not (p in _TAGS and i + 1 < len(loc))]
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        msg = safe_text(msg, _MSG_CHARS)
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = len(parts) - limit
    text = "; ".join(parts[:limit])
    text = f"{text}; and {more} more" if more > 0 else text
    return safe_text(text, MAX_ERROR_MESSAGE_CHARS)
