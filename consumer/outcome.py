"""How one record or one attempt ended on this node, as a value: the outcome of a claim.

Owns the names operators see in metrics and logs (`succeeded`, `failed:timeout`, ...).
Must never send anything: whoever ends a job returns one of these; counting is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

from i2v_fleet.schemas import StrEnum


class Ending(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"
    """This attempt was handed back: the next one is on `i2v.requests`."""
    DEAD_LETTERED = "dead_lettered"
    """Not a job at all: the record went to the DLQ and nobody could be answered."""


@dataclass(frozen=True)
class Outcome:
    """What ended a claimed record or attempt, with the error code or requeue reason."""

    ending: Ending
    code: str = ""

    @property
    def label(self) -> str:
        """`succeeded`, `failed:timeout`, `requeued:shutdown`: the key in node stats."""
        return f"{self.ending.value}:{self.code}" if self.code else self.ending.value


SUCCEEDED = Outcome(Ending.SUCCEEDED)
CANCELLED = Outcome(Ending.CANCELLED)
DEAD_LETTERED = Outcome(Ending.DEAD_LETTERED)


def failed(code: str) -> Outcome:
    return Outcome(Ending.FAILED, code)
