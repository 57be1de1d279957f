"""Events: every type decodes through the one union adapter; terminal types are known."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from i2v_fleet.schemas import (
    CANCEL_ADAPTER,
    JOB_EVENT_ADAPTER,
    NODE_INFO_ADAPTER,
    PROGRESS_ADAPTER,
    CancelledEvent,
    CancelRequest,
    ErrorCode,
    EventType,
    FailedEvent,
    HeartbeatEvent,
    JobRequest,
    JobState,
    Layout,
    NodeInfo,
    Phase,
    ProgressEvent,
    RecordRef,
    RequeuedEvent,
    StartedEvent,
    SucceededEvent,
    utcnow,
)
from tests.schemas.strategies import job_requests

_ERROR = {"code": "timeout", "message": "ran past timeout_s=60", "retryable": False}
_RESULT = {
    "bucket": "i2v-videos",
    "key": "jobs/x/video.mp4",
    "url": "http://127.0.0.1:9000/i2v-videos/jobs/x/video.mp4?X-Amz-Signature=abc",
    "url_expires_at": "2026-01-08T00:00:00Z",
    "poster_key": "jobs/x/poster.jpg",
    "size_bytes": 12345,
    "sha256": "a" * 64,
    "width": 832,
    "height": 480,
    "num_frames": 81,
    "fps": 16,
    "timings": {"denoising": 10.5, "total": 20.0},
}


def _payload(kind: EventType, request: dict[str, Any]) -> dict[str, Any]:
    lease = (utcnow() + timedelta(seconds=60)).isoformat()
    extra: dict[EventType, dict[str, Any]] = {
        EventType.STARTED: {"lease_expires_at": lease, "request": request},
        EventType.HEARTBEAT: {"lease_expires_at": lease},
        EventType.SUCCEEDED: {"result": _RESULT},
        EventType.FAILED: {"error": _ERROR},
        EventType.CANCELLED: {"reason": "user pressed stop"},
        EventType.REQUEUED: {"reason": "lease_expired", "next_attempt": 2},
    }
    return {
        "job_id": request["job_id"],
        "seq": 3,
        "node_id": "node-a",
        "attempt": 1,
        "type": kind.value,
        **extra[kind],
    }


_CLASSES = {
    EventType.STARTED: StartedEvent,
    EventType.HEARTBEAT: HeartbeatEvent,
    EventType.SUCCEEDED: SucceededEvent,
    EventType.FAILED: FailedEvent,
    EventType.CANCELLED: CancelledEvent,
    EventType.REQUEUED: RequeuedEvent,
}


@given(st.sampled_from(list(EventType)), job_requests())
def test_every_event_type_decodes_through_the_union_adapter(
    kind: EventType, request: dict[str, Any]
) -> None:
    """An event of any type, as JSON bytes, decodes to its own class and back unchanged."""
    event = JOB_EVENT_ADAPTER.validate_python(_payload(kind, request))
    assert type(event) is _CLASSES[kind]
    wire = JOB_EVENT_ADAPTER.dump_json(event)
    again = JOB_EVENT_ADAPTER.validate_json(wire)
    assert again == event
    assert EventType(again.type).is_terminal() == (
        kind in {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED}
    )


def test_unknown_event_type_is_refused() -> None:
    """A record with a type the contract does not know is an error, not a silent default."""
    with pytest.raises(ValidationError, match="started"):
        JOB_EVENT_ADAPTER.validate_python(
            {**_payload(EventType.FAILED, {"job_id": str(uuid.uuid4())}), "type": "exploded"}
        )


def test_started_carries_exactly_one_of_request_and_ref() -> None:
    """A reaper can only re-publish a job whose started event has the request or its address."""
    base = _payload(EventType.STARTED, {"job_id": str(uuid.uuid4())})
    base.pop("request")
    with pytest.raises(ValidationError, match="exactly one"):
        StartedEvent.model_validate(base)
    ref = RecordRef(topic="i2v.requests", partition=1, offset=5)
    assert StartedEvent.model_validate({**base, "request_ref": ref}).request_ref == ref


def test_error_info_carries_a_stable_code() -> None:
    """Failed events carry one of the documented codes and their retry advice."""
    event = JOB_EVENT_ADAPTER.validate_python(
        _payload(EventType.FAILED, {"job_id": str(uuid.uuid4())})
    )
    assert isinstance(event, FailedEvent)
    assert event.error.code is ErrorCode.TIMEOUT
    assert {c.value for c in ErrorCode} == {
        "invalid_request",
        "image_fetch_failed",
        "image_invalid",
        "expired",
        "timeout",
        "cancelled",
        "out_of_memory",
        "worker_lost",
        "storage_failed",
        "internal",
        "preset_unavailable",
    }
    assert ErrorCode.IMAGE_INVALID.is_client_error
    assert not ErrorCode.WORKER_LOST.is_client_error


def test_job_states_know_which_are_terminal() -> None:
    """Clients stop following a job once its state is terminal."""
    assert [s for s in JobState if s.is_terminal()] == [
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
    ]


def test_progress_cancel_and_node_messages_round_trip() -> None:
    """The other topics' messages decode through their adapters unchanged."""
    job_id = uuid.uuid4()
    progress = ProgressEvent(
        job_id=job_id, attempt=1, phase=Phase.DENOISING, step=3, total_steps=30, percent=12.5
    )
    assert PROGRESS_ADAPTER.validate_json(progress.model_dump_json()) == progress
    cancel = CancelRequest(job_id=job_id, reason="no longer needed")
    assert CANCEL_ADAPTER.validate_json(cancel.model_dump_json()) == cancel
    node = NodeInfo(
        node_id="node-a",
        hostname="h",
        version="0.1.0",
        state="ready",
        device="cuda",
        layout=Layout(nproc=8, ulysses_size=8, dit_fsdp=True),
        current_jobs=[job_id],
    )
    assert NODE_INFO_ADAPTER.validate_json(node.model_dump_json()) == node


def test_progress_percent_is_bounded() -> None:
    """Percent outside 0..100 is a bug in the emitter and is refused."""
    with pytest.raises(ValidationError, match="percent"):
        ProgressEvent(
            job_id=uuid.uuid4(), attempt=1, phase="denoising", step=1, total_steps=1, percent=101
        )


def test_started_event_embeds_the_full_request() -> None:
    """The request inside a started event decodes to the same JobRequest."""
    request = JobRequest(job_id=uuid.uuid4(), prompt="p", image={"url": "https://a.io/x.jpg"})
    event = StartedEvent(
        job_id=request.job_id,
        seq=0,
        node_id="n",
        attempt=1,
        lease_expires_at=utcnow(),
        request=request,
    )
    decoded = JOB_EVENT_ADAPTER.validate_json(event.model_dump_json())
    assert isinstance(decoded, StartedEvent)
    assert decoded.request == request
