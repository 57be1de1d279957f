"""Failpoints: named moments where a node can be told to die, to prove nothing is lost.

Owns the names and the `I2V_FAILPOINTS` syntax (`name[=probability],...`; a bare name
fires at its first hit). The kill is SIGKILL of this very process, the same as `kill -9`
from outside: no cleanup, no final event, no commit. Unset (the default) it costs one set
lookup per point. Test and staging use only.
"""

from __future__ import annotations

import logging
import os
import random
import signal

log = logging.getLogger(__name__)

POINTS: dict[str, str] = {
    "before_claim": "a record was fetched; nothing was written for it yet",
    "after_started": "`started` is acked; the record is not committed yet",
    "after_commit": "the claim is committed; the job has not run yet",
    "mid_denoise": "the engine reported a denoising step past the first",
    "mid_upload": "the video is uploaded; poster and meta.json are not",
    "after_upload": "meta.json is stored; the final event is not sent yet",
}


class Failpoints:
    """The armed points of one process."""

    def __init__(self, spec: str = "") -> None:
        self._armed: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, chance = part.partition("=")
            if name not in POINTS:
                raise ValueError(
                    f"unknown failpoint {name!r} in I2V_FAILPOINTS; known: {', '.join(POINTS)}"
                )
            probability = float(chance) if chance else 1.0
            if not 0.0 < probability <= 1.0:
                raise ValueError(f"failpoint {name}: probability must be in (0, 1]; got {chance}")
            self._armed[name] = probability
        if self._armed:
            log.warning("failpoints armed: %s", ", ".join(sorted(self._armed)))

    def hit(self, name: str) -> None:
        """Die here, as `kill -9` would, if `name` is armed and its dice say so."""
        chance = self._armed.get(name)
        if chance is None or random.random() >= chance:
            return
        log.warning("failpoint %s: killing this process (SIGKILL)", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
