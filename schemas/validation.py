"""Turn pydantic's validation errors into one stable, human line that names the field.

Owns the wording of `invalid_request` messages. Must never echo the offending input.
"""

from __future__ import annotations

from pydantic import ValidationError

_TAGS = {"url", "s3", "base64", "attention", "first_block", "none"}


def describe_validation_error(exc: ValidationError, *, limit: int = 5) -> str:
    """`field: what is wrong` for each error, joined with `; `; input values are never echoed."""
    parts: list[str] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [str(p) for p in err["loc"]]
        # Tagged unions add the tag to the path (image.url.url): drop it, it repeats.
        loc = [p for i, p in enumerate(loc) if not (p in _TAGS and i + 1 < len(loc))]
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = len(parts) - limit
    text = "; ".join(parts[:limit])
    return f"{text}; and {more} more" if more > 0 else text
