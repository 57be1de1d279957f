"""`Client`: the same calls as `AsyncClient` for code that has no event loop.

Owns a private event loop on a background thread where the async client lives; every
method hands its coroutine to that loop and waits. Must never touch the caller's loop.

    with Client() as client:
        job = client.submit("cat.jpg", prompt="the cat yawns")
        print(client.wait(job.job_id).url)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from i2v_fleet.schemas import JobResult, NodeInfo

from .client import DEFAULT_LOOKBACK, AsyncClient, Event, JobHandle, JobStatus, QueueDepth

T = TypeVar("T")


class Client:
    """Synchronous client. Use as `with Client() as client:`; arguments as AsyncClient's."""

    def __init__(self, **kwargs: Any) -> None:
        self._client = AsyncClient(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="i2v-client", daemon=True
        )

    def __enter__(self) -> Client:
        self._thread.start()
        self._run(self._client.__aenter__())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def submit(
        self,
        image: str | Path | bytes | Mapping[str, Any],
        prompt: str,
        *,
        job_id: UUID | str | None = None,
        **params: Any,
    ) -> JobHandle:
        return self._run(self._client.submit(image, prompt, job_id=job_id, **params))

    def cancel(
        self, job_id: UUID | str, reason: str | None = None, requested_by: str | None = None
    ) -> None:
        self._run(self._client.cancel(job_id, reason, requested_by))

    def wait(
        self, job_id: UUID | str, timeout: float | None = None, since: datetime | None = None
    ) -> JobResult:
        return self._run(self._client.wait(job_id, timeout, since))

    def watch(self, job_id: UUID | str, since: datetime | None = None) -> Iterator[Event]:
        events = self._client.watch(job_id, since)
        try:
            while True:
                try:
                    yield self._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def status(self, job_id: UUID | str, lookback: timedelta = DEFAULT_LOOKBACK) -> JobStatus:
        return self._run(self._client.status(job_id, lookback))

    def nodes(self, lookback: timedelta = timedelta(days=1)) -> list[NodeInfo]:
        return self._run(self._client.nodes(lookback))

    def queue(self) -> QueueDepth:
        return self._run(self._client.queue())

    def _run(self, awaitable: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_await(awaitable), self._loop).result()


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable
