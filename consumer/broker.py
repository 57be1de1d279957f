"""Whether this node can reach its Kafka broker, and one clear account of each outage.

Owns the broker probe behind `/readyz` (a metadata round trip every BROKER_CHECK_S), the
outage log (one structured warning when the broker is lost, a reminder every
`remind_s`, one line with the outage's duration when it is back), and the filter that keeps
the Kafka client's own reconnect lines from flooding the log. Must never block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]


class BrokerWatch:
    """Probes the broker and says whether it is reachable.

    The broker counts as lost once no probe has succeeded for `down_after_s` (two missed
    probes plus one probe timeout by default: about 15 s), and as back at the first probe
    that succeeds. Anything that learns of trouble sooner (a failed commit) may call
    `suspect()` to probe at once.
    """

    def __init__(
        self,
        probe: Probe,
        interval_s: float = 5.0,
        *,
        timeout_s: float | None = None,
        remind_s: float = 60.0,
        name: str = "broker",
    ) -> None:
        self._probe = probe
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else min(5.0, max(interval_s, 1.0))
        self.down_after_s = 2 * interval_s + self.timeout_s
        self.remind_s = remind_s
        self.name = name
        self._last_ok = time.monotonic()
        self._down_since: float | None = None
        self._last_reminder = 0.0
        self._last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    @property
    def down_for_s(self) -> float:
        """How long the current outage has lasted (0 while reachable)."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def start(self) -> None:
        self._last_ok = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"i2v-{self.name}-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._down_since is not None:
            KAFKA_NOISE.outage_ended(id(self))

    def suspect(self) -> None:
        """Probe now rather than at the next interval."""
        self._wake.set()

    async def check(self) -> bool:
        """One probe; updates the state and logs a lost or regained broker."""
        try:
            await asyncio.wait_for(self._probe(), self.timeout_s)
        except Exception as exc:
            self._last_error = type(exc).__name__
            self._failed()
            return False
        self._ok()
        return True

    async def _run(self) -> None:
        while True:
            await self.check()
            self._wake.clear()
            pause = self.interval_s if self.reachable else min(self.interval_s, 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    def _failed(self) -> None:
        now = time.monotonic()
        if self._down_since is None:
            if now - self._last_ok < self.down_after_s:
                return
            self._down_since = self._last_reminder = now
            KAFKA_NOISE.outage_started(id(self))
            log.warning(
                "kafka broker unreachable: no answer for %.0f s (%s); not ready, "
                "claims wait until it is back",
                now - self._last_ok,
                self._last_error,
                extra={"kafka_outage": "started", "kafka_down_s": round(now - self._last_ok, 1)},
            )
        elif now - self._last_reminder >= self.remind_s:
            self._last_reminder = now
            log.warning(
                "kafka broker still unreachable after %.0f s (%s; %d client log lines held back)",
                now - self._down_since,
                self._last_error,
                KAFKA_NOISE.suppressed,
                extra={"kafka_outage": "ongoing", "kafka_down_s": round(now - self._down_since, 1)},
            )

    def _ok(self) -> None:
        now = time.monotonic()
        self._last_ok = now
        if self._down_since is not None:
            held = KAFKA_NOISE.outage_ended(id(self))
            log.warning(
                "kafka broker reachable again after an outage of %.1f s "
                "(%d client log lines held back)",
                now - self._down_since,
                held,
                extra={"kafka_outage": "ended", "kafka_down_s": round(now - self._down_since, 1)},
            )
            self._down_since = None


class KafkaNoise(logging.Filter):
    """Keeps the Kafka client's warnings and errors from flooding the log.

    During an outage that a `BrokerWatch` reported, they are held back (counted; the watch
    reports the count). Otherwise each distinct line passes at most once per `every_s`.
    Attach it to the handlers: records of the client's child loggers never meet a filter
    on the `aiokafka` logger itself.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.suppressed = 0
        self._outages: set[int] = set()
        self._last: dict[tuple[str, str], float] = {}
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return True
        if self._outages:
            self.suppressed += 1
            self._held += 1
            return False
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self.suppressed += 1
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True

    def outage_started(self, watch: int) -> None:
        if not self._outages:
            self._held = 0
        self._outages.add(watch)

    def outage_ended(self, watch: int) -> int:
        """Ends one watch's outage; returns the lines held back during it."""
        self._outages.discard(watch)
        return self._held


KAFKA_NOISE = KafkaNoise()
"""The process's one filter; `logs.configure` puts it on the handler."""
