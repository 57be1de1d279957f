"""The engine's life as a named state, and which moves between states are allowed.

Owns EngineState and the transition table (Cog's WorkerState). Must never move a state by
itself: EngineHost moves it, and a move not in the table is a bug that raises at once.
"""

from __future__ import annotations

from enum import StrEnum

from i2v_fleet.consumer.errors import InternalError


class EngineState(StrEnum):
    """Where the engine is in its life; it serves jobs (`EngineHost.alive`) in READY, BUSY."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEFUNCT = "defunct"
    """A rank died, froze or fell out of step, or a job was abandoned: restart it."""
    CLOSED = "closed"

    @property
    def serving(self) -> bool:
        return self in (EngineState.READY, EngineState.BUSY)

    def to(self, state: EngineState) -> EngineState:
        """`state`, when the engine may go there from here; else InternalError."""
        if state not in _NEXT[self]:
            raise InternalError(f"engine state: no transition from {self} to {state}")
        return state


_NEXT: dict[EngineState, frozenset[EngineState]] = {
    EngineState.NEW: frozenset({EngineState.STARTING, EngineState.CLOSED}),
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.DEFUNCT, EngineState.CLOSED}),
    EngineState.READY: frozenset({EngineState.BUSY, EngineState.DEFUNCT, EngineState.CLOSED}),
    EngineState.BUSY: frozenset({EngineState.READY, EngineState.DEFUNCT, EngineState.CLOSED}),
    # Only a fresh start leaves DEFUNCT; nothing leaves CLOSED.
    EngineState.DEFUNCT: frozenset({EngineState.STARTING, EngineState.CLOSED}),
    EngineState.CLOSED: frozenset(),
}
