"""Admission of request records, in process: whatever a record holds, the node answers it
with a stable code or sets it aside in the DLQ, and never fails on its own refusal.

Admission and the supervisor's claim run with the real `Emitter` (so every event is built
and encoded exactly as on a node) over a producer that records what it is asked to send, or
refuses on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from i2v_fleet.consumer.admission import Admission
from i2v_fleet.consumer.claims import Claims
from i2v_fleet.consumer.events import Emitter
from i2v_fleet.consumer.metrics import Metrics
from i2v_fleet.consumer.redelivery import Redelivery
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.consumer.supervisor import Supervisor
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    JOB_REQUEST_ADAPTER,
    ErrorCode,
    FailedEvent,
    JobRequest,
    TopicNames,
)
from tests.schemas.strategies import job_requests

TOPICS = TopicNames()
JOB_ID = "3f2b8c1e-1d2a-4c55-9d7e-0b1f2a3c4d5e"


@dataclass
class _Producer:
    """Records `send_and_wait`/`send` calls; raises `fail` instead while it is set."""

    sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )
    fail: Exception | None = None
    fail_topics: tuple[str, ...] = ()

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> None:
        if self.fail is not None and (not self.fail_topics or topic in self.fail_topics):
            raise self.fail
        self.sent.append((topic, value, key, list(headers or [])))

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> None:
        await self.send_and_wait(topic, value, key, headers)

    def on(self, topic: str) -> list[tuple[bytes, bytes | None, dict[str, bytes]]]:
        return [(v, k, dict(h)) for t, v, k, h in self.sent if t == topic]


@dataclass
class _Record:
    value: bytes | None
    key: bytes | None = None
    topic: str = TOPICS.requests
    partition: int = 0
    offset: int = 7
    timestamp: int = 1_700_000_000_000


def _node(distilled: bool = False) -> tuple[Supervisor, _Producer]:
    """A supervisor with its admission and redelivery over a recording producer."""
    settings = WorkerSettings(_env_file=None, node_id="admission-test", distilled=distilled)  # type: ignore[call-arg]
    store = SimpleNamespace(finished=_nothing)
    supervisor = Supervisor(settings, engine=None, store=store, policy=None)  # type: ignore[arg-type]
    producer = _Producer()
    supervisor.emitter = Emitter(producer, TOPICS, settings.node_id)  # type: ignore[arg-type]
    cancels = SimpleNamespace(cancelled=lambda job_id: None)
    supervisor.admission = Admission(
        supervisor.emitter,
        cancels,
        store,  # type: ignore[arg-type]
        Metrics(),
        lease_s=settings.lease_s,
        distilled=distilled,
    )
    supervisor.redelivery = Redelivery(supervisor.admission, supervisor.claim_tries, 0.0)
    supervisor.retry_pause_s = 0.0
    return supervisor, producer


async def _nothing(job_id: Any) -> None:
    return None


async def _admit(value: bytes | None, distilled: bool = False) -> tuple[Any, _Producer]:
    supervisor, producer = _node(distilled)
    admitted = await supervisor.admission.admit(_Record(value))
    return (admitted if isinstance(admitted, JobRequest) else None), producer


def _outcome(job: Any, producer: _Producer, value: bytes | None) -> str:
    """What the node did with one record, after checking that everything it sent is valid."""
    events = [JOB_EVENT_ADAPTER.validate_json(v) for v, _, _ in producer.on(TOPICS.status)]
    dead = producer.on(TOPICS.dlq)
    for _, _, headers in dead:
        assert headers["i2v-error-code"].decode() in {c.value for c in ErrorCode}
        headers["i2v-error-message"].decode()  # valid UTF-8
    assert len(dead) <= 1
    if job is not None:
        assert [e.type for e in events] == ["started"]
        assert not dead
        return "started"
    finals = [e for e in events if e.type in {"failed", "succeeded", "cancelled"}]
    assert len(finals) <= 1, events
    if finals:
        final = finals[0]
        assert isinstance(final, FailedEvent)
        try:
            JOB_REQUEST_ADAPTER.validate_json(value or b"")
        except ValidationError:
            assert final.error.code is ErrorCode.INVALID_REQUEST
        else:  # a valid job can still end at claim (expired, say)
            assert not dead
        assert 1 <= final.attempt <= 100
        return "failed+dlq" if dead else "failed"
    assert len(dead) == 1, f"a record was neither answered nor dead-lettered: {value!r}"
    assert dead[0][0] == (value or b"")
    return "dlq"


odd_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), min_size=0, max_size=40
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def damaged_jobs(draw: st.DrawFn) -> bytes:
    """A valid job with some fields replaced, removed or added, as JSON text."""
    job: dict[str, Any] = draw(job_requests())
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "remove", "add", "long_name"]))
        name = draw(st.sampled_from([*job, "attempt", "metadata", "job_id"]))
        if action == "replace":
            job[name] = draw(json_value)
        elif action == "remove":
            job.pop(name, None)
        elif action == "add":
            job[draw(odd_text)] = draw(json_value)
        else:
            job["x" * draw(st.integers(100, 5000))] = 1
    return json.dumps(job, ensure_ascii=draw(st.booleans())).encode("utf-8", errors="surrogatepass")


records = st.one_of(
    damaged_jobs(),
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v).encode("utf-8", errors="surrogatepass")),
    job_requests().map(lambda j: json.dumps(j).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
async def test_every_record_is_answered_or_dead_lettered_and_nothing_raises(value: bytes) -> None:
    """Job-shaped JSON, raw bytes and odd Unicode: the node always ends in exactly one of
    `started`, `failed/invalid_request` (plus a DLQ copy when the record's attempt or
    metadata were unusable) or a DLQ copy alone; every event it sends decodes."""
    job, producer = await _admit(value)
    _outcome(job, producer, value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # The refusal message would echo a control character (in the id, or in a name).
        (b'{"job_id": "3f2b8c1e\\u0001", "prompt": "x"}', "dlq"),
        (f'{{"job_id": "{JOB_ID}", "a\\u0000b": 1}}'.encode(), "failed"),
        # A lone surrogate is not valid JSON text: not even the id can be read.
        (f'{{"job_id": "{JOB_ID}", "\\ud800": 1}}'.encode(), "dlq"),
        (f'{{"job_id": "{JOB_ID}", "\\u202e": 1}}'.encode(), "failed"),
        # Thousands of characters in a field name or a metadata key.
        (json.dumps({"job_id": JOB_ID, "n" * 5000: 1}).encode(), "failed"),
        (json.dumps({"job_id": JOB_ID, "metadata": {"k" * 5000: "v"}}).encode(), "failed+dlq"),
        # The record's own attempt cannot go into an event.
        (json.dumps({"job_id": JOB_ID, "attempt": 0}).encode(), "failed+dlq"),
        (json.dumps({"job_id": JOB_ID, "attempt": -3}).encode(), "failed+dlq"),
        (json.dumps({"job_id": JOB_ID, "attempt": 2**70}).encode(), "failed+dlq"),
        (json.dumps({"job_id": JOB_ID, "attempt": "2"}).encode(), "failed+dlq"),
        # Wrong-typed metadata: the id is readable, so the client still hears back.
        (json.dumps({"job_id": JOB_ID, "metadata": ["a"]}).encode(), "failed+dlq"),
        (json.dumps({"job_id": JOB_ID, "metadata": {"a": 1}}).encode(), "failed+dlq"),
        # No id, and a message with a control character.
        (b'{"prompt": "\\u0007", "\\u0001": 2}', "dlq"),
        (None, "dlq"),
    ],
)
async def test_hostile_records_that_used_to_wedge_a_partition(value: Any, expected: str) -> None:
    """Each kind of record once made building its refusal fail, so it was fetched forever."""
    job, producer = await _admit(value)
    assert _outcome(job, producer, value) == expected
    for raw, _, _ in producer.on(TOPICS.status):
        event = JOB_EVENT_ADAPTER.validate_json(raw)
        assert event.attempt == 1 or expected == "failed"
        assert len(event.error.message) <= 2000  # type: ignore[union-attr]


async def test_a_readable_id_keeps_its_usable_attempt_and_metadata() -> None:
    """Fields that pass the job's own rules are echoed; only unusable ones are dropped."""
    value = json.dumps(
        {"job_id": JOB_ID, "attempt": 2, "metadata": {"tenant": "acme"}, "num_frames": 80}
    ).encode()
    job, producer = await _admit(value)
    assert _outcome(job, producer, value) == "failed"
    ((raw, _, _),) = producer.on(TOPICS.status)
    event = JOB_EVENT_ADAPTER.validate_json(raw)
    assert (event.attempt, event.metadata) == (2, {"tenant": "acme"})


class _Consumer:
    def __init__(self) -> None:
        self.tp = TopicPartition(TOPICS.requests, 0)
        self.seeks: list[int] = []
        self.commits: list[int] = []

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def subscription(self) -> set[str]:
        return {TOPICS.requests}

    def pause(self, *tps: Any) -> None:
        pass

    def resume(self, *tps: Any) -> None:
        pass

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append(offset)

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.commits.extend(offsets.values())


def _claims(consumer: _Consumer) -> Claims:
    return Claims(consumer, TOPICS.requests, on_left=lambda: None)  # type: ignore[arg-type]


async def test_a_record_whose_event_cannot_be_built_is_set_aside_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that is not the broker's would repeat on every fetch: the record goes to
    the DLQ with the reason (code `internal`) and its offset is committed."""
    supervisor, producer = _node()
    consumer = _Consumer()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("cannot build this event")

    monkeypatch.setattr("i2v_fleet.consumer.events.FailedEvent", broken)
    record = _Record(json.dumps({"job_id": JOB_ID, "num_frames": 80}).encode(), offset=41)
    await supervisor._serve(_claims(consumer), record, waiting=False)
    assert consumer.commits == [42]
    ((value, _, headers),) = producer.on(TOPICS.dlq)
    assert value == record.value
    assert headers["i2v-error-code"] == b"internal"
    assert b"cannot build this event" in headers["i2v-error-message"]


async def test_broker_trouble_is_retried_a_bounded_number_of_times() -> None:
    """A claim the broker refuses is fetched again, at most `claim_tries` times; then the
    record is dead-lettered (once the DLQ takes it) and the partition moves on."""
    supervisor, producer = _node()
    consumer = _Consumer()
    producer.fail = KafkaConnectionError("broker went away")
    producer.fail_topics = (TOPICS.status,)
    value = json.dumps({"job_id": JOB_ID, "num_frames": 80}).encode()
    record = _Record(value, offset=9)
    for attempt in range(1, supervisor.claim_tries + 1):
        await supervisor._serve(_claims(consumer), record, waiting=False)
        if attempt < supervisor.claim_tries:
            assert consumer.commits == []
            assert consumer.seeks[-1] == 9
    assert consumer.commits == [10]
    ((_, _, headers),) = producer.on(TOPICS.dlq)
    assert b"fetched 5 times" in headers["i2v-error-message"]
    # Another record starts its own count.
    record = _Record(value, offset=10)
    await supervisor._serve(_claims(consumer), record, waiting=False)
    assert consumer.commits == [10]


async def test_a_dlq_that_refuses_too_keeps_the_record() -> None:
    """When neither the event nor the DLQ copy can be written, nothing is committed: the
    record is not lost, it is fetched again once the broker takes writes."""
    supervisor, producer = _node()
    consumer = _Consumer()
    producer.fail = KafkaConnectionError("broker went away")
    record = _Record(b"not json", offset=3)
    for _ in range(supervisor.claim_tries + 2):
        await supervisor._serve(_claims(consumer), record, waiting=False)
    assert consumer.commits == []
    producer.fail = None
    await supervisor._serve(_claims(consumer), record, waiting=False)
    assert consumer.commits == [4]
    assert len(producer.on(TOPICS.dlq)) == 1


def _job_record(preset: str) -> bytes:
    return json.dumps(
        {
            "job_id": JOB_ID,
            "prompt": "a cat",
            "image": {"url": "https://a.io/x.png"},
            "quality_preset": preset,
            **({"infer_steps": 8, "guidance_scale": 1.0} if preset == "custom" else {}),
        }
    ).encode()


@pytest.mark.parametrize(
    ("distilled", "preset", "expected"),
    [
        (False, "turbo", "failed"),
        (False, "balanced", "started"),
        (True, "turbo", "started"),
        (True, "high", "failed"),
        (True, "custom", "failed"),
    ],
)
async def test_a_preset_the_node_does_not_serve_fails_preset_unavailable(
    distilled: bool, preset: str, expected: str
) -> None:
    """Turbo runs only on DISTILLED nodes, which run nothing else; the other kind of node
    fails the job at claim with `preset_unavailable` (final: the same node would refuse it
    again), naming the preset and what serves it, and never starts it."""
    value = _job_record(preset)
    job, producer = await _admit(value, distilled)
    assert _outcome(job, producer, value) == expected
    if expected == "failed":
        ((raw, _, _),) = producer.on(TOPICS.status)
        event = JOB_EVENT_ADAPTER.validate_json(raw)
        assert isinstance(event, FailedEvent)
        assert event.error.code is ErrorCode.PRESET_UNAVAILABLE
        assert not event.error.retryable
        assert repr(preset) in event.error.message
        assert "DISTILLED" in event.error.message
