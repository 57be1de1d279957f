"""`AsyncClient`: submit image-to-video jobs and follow them to their video.

Owns building and validating a `JobRequest` from friendly arguments, publishing it, and
following only that job's partitions of `i2v.status` and `i2v.progress`. Must never block
the caller's event loop or let a broker library's exception escape.

    async with AsyncClient() as client:                 # KAFKA_* and I2V_TOPIC_* from env
        job = await client.submit("cat.jpg", prompt="the cat yawns", quality_preset="fast")
        async for event in client.watch(job.job_id):
            print(event)
        result = await client.wait(job.job_id)          # raises JobFailed / JobCancelled
"""

from __future__ import annotations

import asyncio
import base64
import enum
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from i2v_fleet.connection import KafkaSettings, ObjectStoreSettings, TopicSettings
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    MAX_BASE64_IMAGE_BYTES,
    NODE_INFO_ADAPTER,
    PROGRESS_ADAPTER,
    WORKERS_GROUP,
    CancelledEvent,
    CancelRequest,
    ErrorInfo,
    EventType,
    FailedEvent,
    JobEvent,
    JobRequest,
    JobResult,
    JobState,
    NodeInfo,
    ProgressEvent,
    SucceededEvent,
    TopicNames,
    describe_validation_error,
    utcnow,
)
from i2v_fleet.schemas.topics import HEADER_SCHEMA_VERSION

from .errors import BrokerError, I2VError, InvalidJob, JobCancelled, JobFailed, WaitTimeout
from .transport import KafkaTransport, Transport, partition_for

DEFAULT_LOOKBACK = timedelta(days=1)
"""How far back `watch` and `wait` look for a job's events when not told (progress
events are kept one day)."""


class ClientState(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


@dataclass(frozen=True)
class JobStatus:
    """What is known of a job from its events within the look-back."""

    job_id: UUID
    state: JobState
    attempt: int = 0
    node_id: str | None = None
    last_event: JobEvent | None = None
    progress: ProgressEvent | None = None
    result: JobResult | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class QueueDepth:
    """Jobs published to `i2v.requests` and not yet claimed, per partition and in total."""

    partitions: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.partitions.values())


@dataclass(frozen=True)
class JobHandle:
    """A submitted job: its id, where its request landed, and the request itself."""

    job_id: UUID
    partition: int
    offset: int
    submitted_at: datetime
    request: JobRequest


Event = JobEvent | ProgressEvent


class AsyncClient:
    """Submit and follow jobs. Use as `async with AsyncClient() as client:`."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings | None = None,
        topics: TopicNames | None = None,
        transport: Transport | None = None,
        object_store: ObjectStoreSettings | None = None,
    ) -> None:
        """`object_store`: where `submit` uploads local images over the inline cap (the
        fleet's own MinIO bucket, which the nodes read `s3` references from)."""
        self.topics = topics or TopicSettings().names()
        self.object_store = object_store
        self._transport = transport or KafkaTransport(kafka or KafkaSettings())
        self.state = ClientState.UNOPENED

    async def __aenter__(self) -> AsyncClient:
        if self.state is not ClientState.UNOPENED:
            raise I2VError("a client can be opened once; make a new one")
        await self._transport.start()
        self.state = ClientState.OPENED
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.state is ClientState.OPENED:
            await self._transport.close()
        self.state = ClientState.CLOSED

    # -- submit and cancel -------------------------------------------------------------

    async def submit(
        self,
        image: str | Path | bytes | Mapping[str, Any],
        prompt: str,
        *,
        job_id: UUID | str | None = None,
        **params: Any,
    ) -> JobHandle:
        """Validate and publish a job; returns once every in-sync replica has it.

        `image` is an http(s) URL, a local file path (sent inline, at most 1 MiB), raw
        bytes, or a source mapping (`{"s3": {"bucket": ..., "key": ...}}`). Other job
        fields go in `params` (`quality_preset="fast"`, `num_frames=41`, ...). Giving the
        same `job_id` again resubmits the same job (its result is stored under that id).
        """
        self._check_open()
        job_id = str(job_id or uuid.uuid4())
        # Reading (and maybe uploading) a local file blocks: keep it off the caller's loop.
        source = await asyncio.to_thread(_image_source, image, self.object_store, job_id)
        try:
            request = JobRequest.model_validate(
                {
                    **params,
                    "job_id": job_id,
                    "prompt": prompt,
                    "image": source,
                    "submitted_at": utcnow(),
                }
            )
        except ValidationError as exc:
            raise InvalidJob(describe_validation_error(exc)) from None
        partition, offset = await self._transport.publish(
            self.topics.requests,
            request.key,
            request.model_dump_json().encode(),
            [(HEADER_SCHEMA_VERSION, b"1")],
        )
        return JobHandle(request.job_id, partition, offset, request.submitted_at, request)

    async def cancel(
        self, job_id: UUID | str, reason: str | None = None, requested_by: str | None = None
    ) -> None:
        """Ask for the job to stop: queued, it never runs; running, it stops at the next step."""
        self._check_open()
        cancel = CancelRequest(job_id=UUID(str(job_id)), reason=reason, requested_by=requested_by)
        await self._transport.publish(
            self.topics.control,
            str(cancel.job_id).encode(),
            cancel.model_dump_json().encode(),
            [(HEADER_SCHEMA_VERSION, b"1")],
        )

    # -- follow --------------------------------------------------------------------------

    async def watch(
        self, job_id: UUID | str, since: datetime | None = None
    ) -> AsyncGenerator[Event, None]:
        """The job's progress and status events in order, ending after its final event.

        Reads only the job's own partition of each topic, from `since` (default: one day
        back), so a job submitted earlier replays its history.
        """
        self._check_open()
        job_id = UUID(str(job_id))
        key = str(job_id).encode()
        status, progress = self.topics.status, self.topics.progress
        partitions = [
            (status, partition_for(key, await self._transport.partitions(status))),
            (progress, partition_for(key, await self._transport.partitions(progress))),
        ]
        start = since or (utcnow() - DEFAULT_LOOKBACK)
        since_ms = int(start.timestamp() * 1000)
        async for record in self._transport.follow(partitions, since_ms):
            if record.key != key or record.value is None:
                continue
            if record.topic == status:
                event: JobEvent = JOB_EVENT_ADAPTER.validate_json(record.value)
                yield event
                if EventType(event.type).is_terminal():
                    return
            else:
                yield PROGRESS_ADAPTER.validate_json(record.value)

    async def wait(
        self, job_id: UUID | str, timeout: float | None = None, since: datetime | None = None
    ) -> JobResult:
        """The job's result once it succeeds; raises JobFailed, JobCancelled or WaitTimeout."""

        async def final() -> JobResult:
            async for event in self.watch(job_id, since):
                if isinstance(event, SucceededEvent):
                    return event.result
                if isinstance(event, FailedEvent):
                    e = event.error
                    raise JobFailed(event.job_id, e.code.value, e.message, e.retryable)
                if isinstance(event, CancelledEvent):
                    raise JobCancelled(event.job_id, event.reason)
            raise I2VError("the event stream ended before a final event")  # pragma: no cover

        try:
            return await asyncio.wait_for(final(), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout} s; it may still finish: "
                "wait again or watch it"
            ) from None

    async def status(self, job_id: UUID | str, lookback: timedelta = DEFAULT_LOOKBACK) -> JobStatus:
        """The job's latest state from its events in the last `lookback`.

        `queued` means no event was seen: submitted and waiting, or unknown to the fleet.
        """
        self._check_open()
        job_id = UUID(str(job_id))
        key = str(job_id).encode()
        since_ms = int((utcnow() - lookback).timestamp() * 1000)
        partitions = [
            (t, partition_for(key, await self._transport.partitions(t)))
            for t in (self.topics.status, self.topics.progress)
        ]
        events: list[JobEvent] = []
        progress: ProgressEvent | None = None
        for record in await self._transport.read(partitions, since_ms):
            if record.key != key or record.value is None:
                continue
            if record.topic == self.topics.status:
                events.append(JOB_EVENT_ADAPTER.validate_json(record.value))
            else:
                progress = PROGRESS_ADAPTER.validate_json(record.value)
        if not events:
            return JobStatus(job_id, JobState.QUEUED)
        final = next((e for e in events if EventType(e.type).is_terminal()), None)
        last = final or events[-1]
        state = {
            "succeeded": JobState.SUCCEEDED,
            "failed": JobState.FAILED,
            "cancelled": JobState.CANCELLED,
            "requeued": JobState.QUEUED,
        }.get(last.type, JobState.RUNNING)
        return JobStatus(
            job_id,
            state,
            attempt=last.attempt,
            node_id=last.node_id,
            last_event=last,
            progress=progress if state is JobState.RUNNING else None,
            result=last.result if isinstance(last, SucceededEvent) else None,
            error=last.error if isinstance(last, FailedEvent) else None,
        )

    async def nodes(self, lookback: timedelta = timedelta(days=1)) -> list[NodeInfo]:
        """The latest NodeInfo of each node heard from within `lookback`, by node id."""
        self._check_open()
        count = await self._transport.partitions(self.topics.nodes)
        since_ms = int((utcnow() - lookback).timestamp() * 1000)
        latest: dict[str, NodeInfo] = {}
        partitions = [(self.topics.nodes, p) for p in range(count)]
        for record in await self._transport.read(partitions, since_ms):
            if record.value is not None:
                info = NODE_INFO_ADAPTER.validate_json(record.value)
                latest[info.node_id] = info
        return [latest[n] for n in sorted(latest)]

    async def queue(self, group: str = WORKERS_GROUP) -> QueueDepth:
        """Jobs waiting in `i2v.requests`: published and not committed by the workers' group."""
        self._check_open()
        return QueueDepth(await self._transport.backlog(self.topics.requests, group))

    def _check_open(self) -> None:
        if self.state is not ClientState.OPENED:
            raise I2VError(
                f"the client is {self.state.value}; use it inside `async with AsyncClient()`"
            )


def _image_source(
    image: str | Path | bytes | Mapping[str, Any],
    store: ObjectStoreSettings | None,
    job_id: str,
) -> Any:
    if isinstance(image, Mapping):
        return dict(image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"url": image}
    name = "image"
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidJob(f"image: {path} is not a file, nor an http(s) URL")
        name, image = path.name, path.read_bytes()
    if len(image) <= MAX_BASE64_IMAGE_BYTES:
        return {"base64": base64.b64encode(image).decode()}
    if store is None:
        raise InvalidJob(
            f"image: {len(image) / 2**20:.1f} MiB is over the {MAX_BASE64_IMAGE_BYTES // 1024} "
            "KiB inline cap; pass an http(s) URL or an s3 reference, or give the client an "
            "object_store to upload it to"
        )
    return {
        "s3": {"bucket": store.bucket, "key": _upload(store, f"uploads/{job_id}/{name}", image)}
    }


def _upload(store: ObjectStoreSettings, key: str, data: bytes) -> str:
    """Put `data` in the fleet's bucket (blocking; called in a thread) and return its key."""
    import io

    from ._extras import require_extra

    require_extra("s3", ["minio"], "uploading images over the inline cap")
    from minio import Minio
    from minio.error import MinioException

    http = None
    if store.ca_file:  # minio's own client, but trusting the given CAs
        import urllib3

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=300, read=300),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=store.ca_file,
            retries=urllib3.Retry(
                total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
    client = Minio(
        store.endpoint,
        store.access_key,
        store.secret_key.get_secret_value(),
        secure=store.secure,
        region=store.region,
        http_client=http,
    )
    try:
        client.put_object(store.bucket, key, io.BytesIO(data), len(data))
    except (MinioException, OSError) as exc:
        raise BrokerError(
            f"could not upload the image to {store.endpoint}/{store.bucket}: {type(exc).__name__}"
        ) from None
    return key
