"""The result store against the local stack's real S3 server: keys, order, retries, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import traceback
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.datatypes import Object
from minio.error import S3Error, ServerError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from urllib3 import HTTPResponse
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from i2v_fleet.consumer.errors import ImageFetchFailed, StorageFailed
from i2v_fleet.consumer.storage import (
    MAX_PRESIGN_EXPIRY_S,
    RETENTION_RULE_ID,
    ResultStore,
    StoreConfig,
)
from i2v_fleet.producer_sdk.devstack import free_port
from i2v_fleet.producer_sdk.settings import ObjectStoreSettings
from i2v_fleet.schemas import ErrorCode

MEDIUM = timedelta(seconds=5)


def _config(s3: ObjectStoreSettings, **overrides: Any) -> StoreConfig:
    fields: dict[str, Any] = {
        "endpoint": s3.endpoint,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key.get_secret_value(),
        "bucket": s3.bucket,
        "secure": s3.secure,
        "region": s3.region,
        "presign_expiry_s": 3600,
        "retries": 2,
        "backoff_s": 0.01,
    }
    return StoreConfig(**(fields | overrides))


@pytest.fixture
def store(s3: ObjectStoreSettings) -> ResultStore:
    """A store on the test bucket with small, fast retries."""
    return ResultStore(_config(s3))


@pytest.fixture
def raw(s3: ObjectStoreSettings) -> Minio:
    """A plain client to look at the bucket behind the store's back."""
    return Minio(s3.endpoint, s3.access_key, s3.secret_key.get_secret_value(), secure=s3.secure)


def _video(tmp_path: Path, size: int = 64 * 1024) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(os.urandom(size))
    return path


async def _put(store: ResultStore, job_id: uuid.UUID, video: Path, **meta: Any) -> Any:
    return await store.put_result(
        job_id,
        video,
        b"\xff\xd8\xff" + os.urandom(100),
        {"node_id": "n1", **meta},
        width=832,
        height=480,
        num_frames=5,
        fps=16,
        timings={"denoising": 1.5, "total": 2.0},
    )


def _puts(
    monkeypatch: pytest.MonkeyPatch,
    store: ResultStore,
    error: Exception | None = None,
    *,
    suffix: str = "",
    times: int | None = None,
) -> list[str]:
    """Record the store's `put_object` calls; raise `error` for keys ending in `suffix`."""
    real = store._client.put_object
    calls: list[str] = []
    failed = 0

    def put_object(bucket_name: str, object_name: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        calls.append(object_name)
        if error and object_name.endswith(suffix) and (times is None or failed < times):
            failed += 1
            raise error
        return real(bucket_name, object_name, *args, **kwargs)

    monkeypatch.setattr(store._client, "put_object", put_object)
    return calls


def _exists(raw: Minio, bucket: str, key: str) -> bool:
    try:
        raw.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return False
        raise
    return True


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _s3_error(status: int, code: str) -> S3Error:
    return S3Error(HTTPResponse(status=status), code, code, "/bucket/key", "req", "host")


# -- configuration --------------------------------------------------------------------


def test_config_clamps_presign_expiry_and_hides_the_secret() -> None:
    """Presign expiry is clamped to 1 s .. 7 days and the secret key stays out of repr."""
    base = {"endpoint": "h:9000", "access_key": "a", "secret_key": "TOPSECRET", "bucket": "b"}
    assert StoreConfig(**base).presign_expiry_s == MAX_PRESIGN_EXPIRY_S
    assert StoreConfig(**base, presign_expiry_s=30 * 86400).presign_expiry_s == 7 * 86400
    assert StoreConfig(**base, presign_expiry_s=0).presign_expiry_s == 1
    assert "TOPSECRET" not in repr(StoreConfig(**base))
    assert ResultStore.keys(uuid.UUID(int=1)).meta == f"jobs/{uuid.UUID(int=1)}/meta.json"


# -- bucket -----------------------------------------------------------------------------


@pytest.mark.minio
async def test_ensure_bucket_twice_is_harmless_and_keeps_other_rules(
    s3: ObjectStoreSettings, raw: Minio
) -> None:
    """A new bucket gets our expiry rule once, and an operator's own rule survives a restart."""
    bucket = f"i2v-t-{uuid.uuid4().hex[:12]}"
    store = ResultStore(_config(s3, bucket=bucket, retention_days=3))
    await store.ensure_bucket()
    await store.ensure_bucket()
    rules = raw.get_bucket_lifecycle(bucket).rules
    assert [(r.rule_id, r.rule_filter.prefix, r.expiration.days) for r in rules] == [
        (RETENTION_RULE_ID, "jobs/", 3)
    ]

    operator = Rule(ENABLED, Filter(prefix="tmp/"), rule_id="ops", expiration=Expiration(days=1))
    raw.set_bucket_lifecycle(bucket, LifecycleConfig([operator, *rules]))
    await ResultStore(_config(s3, bucket=bucket, retention_days=5)).ensure_bucket()
    rules = raw.get_bucket_lifecycle(bucket).rules
    assert sorted((r.rule_id, r.expiration.days) for r in rules) == [
        (RETENTION_RULE_ID, 5),
        ("ops", 1),
    ]
    assert await store.ping()


# -- results ----------------------------------------------------------------------------


@pytest.mark.minio
async def test_put_result_uploads_three_objects_with_meta_last(
    store: ResultStore, raw: Minio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Video, poster and meta.json land in that order with their content types and digest."""
    job_id, video = uuid.uuid4(), _video(tmp_path)
    calls = _puts(monkeypatch, store)
    before = datetime.now(timezone.utc)
    result = await _put(store, job_id, video)

    keys = store.keys(job_id)
    assert calls == [keys.video, keys.poster, keys.meta]
    types = {key: raw.stat_object(store.config.bucket, key).content_type for key in keys}
    assert types == {
        keys.video: "video/mp4",
        keys.poster: "image/jpeg",
        keys.meta: "application/json",
    }
    data = video.read_bytes()
    assert (result.bucket, result.key, result.poster_key) == (
        store.config.bucket,
        keys.video,
        keys.poster,
    )
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size_bytes == len(data)
    assert (result.width, result.height, result.num_frames, result.fps) == (832, 480, 5, 16)
    assert abs(result.url_expires_at - (before + timedelta(seconds=3600))) < MEDIUM


@pytest.mark.minio
async def test_presigned_url_downloads_the_exact_video(store: ResultStore, tmp_path: Path) -> None:
    """The presigned URL serves the uploaded bytes, here a multipart-sized MP4."""
    video = _video(tmp_path, size=6 * 1024 * 1024 + 123)
    result = await _put(store, uuid.uuid4(), video)
    assert await asyncio.to_thread(_download, result.url) == video.read_bytes()


@pytest.mark.minio
async def test_finished_is_none_before_and_the_meta_after(
    store: ResultStore, tmp_path: Path
) -> None:
    """`finished` sees nothing before the upload and the stored meta and result after it."""
    job_id = uuid.uuid4()
    assert await store.finished(job_id) is None
    result = await _put(store, job_id, _video(tmp_path), attempt=2)

    meta = await store.finished(job_id)
    assert meta is not None
    assert meta["node_id"] == "n1"
    assert meta["attempt"] == 2
    assert meta["result"]["sha256"] == result.sha256
    again = await store.reissue(meta)
    assert again.sha256 == result.sha256
    assert await asyncio.to_thread(_download, again.url) == await asyncio.to_thread(
        _download, result.url
    )


@pytest.mark.minio
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"result": {"key": "x"}}'])
async def test_corrupt_meta_counts_as_not_finished(
    store: ResultStore, raw: Minio, body: bytes
) -> None:
    """A meta.json that is not a stored result does not mark the job finished."""
    job_id = uuid.uuid4()
    raw.put_object(store.config.bucket, store.keys(job_id).meta, io.BytesIO(body), len(body))
    assert await store.finished(job_id) is None


@pytest.mark.minio
async def test_second_put_result_overwrites_the_same_keys(
    store: ResultStore, raw: Minio, tmp_path: Path
) -> None:
    """A second attempt for the same job replaces the first one's objects in place."""
    job_id = uuid.uuid4()
    first = await _put(store, job_id, _video(tmp_path))
    second = await _put(store, job_id, _video(tmp_path))

    assert (first.key, first.poster_key) == (second.key, second.poster_key)
    assert first.sha256 != second.sha256
    listed = raw.list_objects(store.config.bucket, prefix=f"jobs/{job_id}/", recursive=True)
    assert sorted(o.object_name for o in listed) == sorted(store.keys(job_id))
    meta = await store.finished(job_id)
    assert meta is not None
    assert meta["result"]["sha256"] == second.sha256


@pytest.mark.minio
async def test_presign_expiry_above_seven_days_is_clamped(
    s3: ObjectStoreSettings, tmp_path: Path
) -> None:
    """A 30-day expiry yields a 7-day URL, and `url_expires_at` says so."""
    store = ResultStore(_config(s3, presign_expiry_s=30 * 86400))
    before = datetime.now(timezone.utc)
    result = await _put(store, uuid.uuid4(), _video(tmp_path))
    assert parse_qs(urlsplit(result.url).query)["X-Amz-Expires"] == [str(7 * 86400)]
    assert abs(result.url_expires_at - (before + timedelta(days=7))) < MEDIUM


# -- image references -------------------------------------------------------------------


@pytest.mark.minio
async def test_get_image_returns_the_bytes(store: ResultStore, raw: Minio) -> None:
    """An `s3` image reference in the node's store comes back byte for byte."""
    key, data = f"inputs/{uuid.uuid4()}.png", os.urandom(5000)
    raw.put_object(store.config.bucket, key, io.BytesIO(data), len(data))
    assert await store.get_image(store.config.bucket, key) == data


@pytest.mark.minio
async def test_get_image_refuses_an_object_over_the_cap(
    s3: ObjectStoreSettings, raw: Minio
) -> None:
    """An object bigger than `max_image_bytes` is refused from its size, before download."""
    store = ResultStore(_config(s3, max_image_bytes=1000))
    key, data = f"inputs/{uuid.uuid4()}.png", os.urandom(1001)
    raw.put_object(store.config.bucket, key, io.BytesIO(data), len(data))
    with pytest.raises(ImageFetchFailed, match="larger than the limit"):
        await store.get_image(store.config.bucket, key)


@pytest.mark.minio
async def test_get_image_enforces_the_cap_while_reading(
    s3: ObjectStoreSettings, raw: Minio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object that grew after its stat is still refused once the read passes the cap."""
    store = ResultStore(_config(s3, max_image_bytes=1000))
    key, data = f"inputs/{uuid.uuid4()}.png", os.urandom(5000)
    raw.put_object(store.config.bucket, key, io.BytesIO(data), len(data))
    monkeypatch.setattr(
        store._client, "stat_object", lambda bucket, name: Object(bucket, name, size=10)
    )
    with pytest.raises(ImageFetchFailed, match="larger than the limit"):
        await store.get_image(store.config.bucket, key)


@pytest.mark.minio
@pytest.mark.parametrize("missing", ["key", "bucket"])
async def test_get_image_of_a_missing_object_is_the_submitters_error(
    store: ResultStore, missing: str
) -> None:
    """A reference to a missing key or bucket fails as `image_fetch_failed`, not storage."""
    bucket = store.config.bucket if missing == "key" else f"no-such-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageFetchFailed, match="does not exist") as caught:
        await store.get_image(bucket, f"inputs/{uuid.uuid4()}.png")
    assert caught.value.info().code == ErrorCode.IMAGE_FETCH_FAILED


@pytest.mark.minio
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("key:a/../b.png", "not a valid object reference"),
        ("key:./b.png", "not a valid object reference"),
        ("AccessDenied", "read access"),
        ("AllAccessDisabled", "closed to all access"),
        ("InvalidObjectName", "valid object key"),
        ("InvalidBucketName", "valid bucket name"),
        ("KeyTooLongError", "1024 bytes"),
        ("InvalidObjectState", "archived"),
    ],
)
async def test_a_bad_image_reference_is_the_submitters_error_never_internal(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch, fault: str, words: str
) -> None:
    """Every way an `s3` image reference can be at fault ends as `image_fetch_failed` with
    what to change: never `internal` (our bug) nor `storage_failed` (the store's trouble)."""
    key = "inputs/cat.png"
    if fault.startswith("key:"):
        key = fault.removeprefix("key:")
    else:

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise _s3_error(403 if fault.startswith("A") else 400, fault)

        monkeypatch.setattr(store._client, "stat_object", refuse)
    with pytest.raises(ImageFetchFailed, match=words) as caught:
        await store.get_image(store.config.bucket, key)
    info = caught.value.info()
    assert (info.code, info.retryable) == (ErrorCode.IMAGE_FETCH_FAILED, False)


# -- failures ---------------------------------------------------------------------------


@pytest.mark.minio
@pytest.mark.parametrize(
    "error",
    [
        ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer")),
        ReadTimeoutError(None, "/k", "Read timed out."),  # type: ignore[arg-type]
        ServerError("server failed with HTTP status code 503", 503),
        _s3_error(503, "SlowDown"),
        _s3_error(500, "InternalError"),
    ],
    ids=["reset", "read-timeout", "http-503", "SlowDown", "InternalError"],
)
async def test_transient_failures_are_retried_until_success(
    store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Two transient failures of the video upload are retried and the result is complete."""
    job_id = uuid.uuid4()
    calls = _puts(monkeypatch, store, error, suffix="video.mp4", times=2)
    await _put(store, job_id, _video(tmp_path))
    assert calls.count(store.keys(job_id).video) == 3
    assert await store.finished(job_id) is not None


@pytest.mark.minio
async def test_permanent_errors_are_not_retried(
    s3: ObjectStoreSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AccessDenied fails at once with the code and what to check, without sleeping."""
    store = ResultStore(_config(s3, retries=5, backoff_s=1.0))
    calls = _puts(monkeypatch, store, _s3_error(403, "AccessDenied"), suffix="video.mp4")
    start = time.monotonic()
    with pytest.raises(StorageFailed, match="AccessDenied; check MINIO_ACCESS_KEY") as caught:
        await _put(store, uuid.uuid4(), _video(tmp_path))
    assert time.monotonic() - start < 0.9
    assert len(calls) == 1
    info = caught.value.info()
    assert (info.code, info.retryable) == (ErrorCode.STORAGE_FAILED, True)


@pytest.mark.minio
async def test_missing_bucket_fails_at_once(s3: ObjectStoreSettings, tmp_path: Path) -> None:
    """A bucket that does not exist is a permanent NoSuchBucket failure, also for `finished`."""
    store = ResultStore(_config(s3, bucket=f"no-such-{uuid.uuid4().hex[:8]}", backoff_s=1.0))
    start = time.monotonic()
    with pytest.raises(StorageFailed, match="NoSuchBucket; create the bucket"):
        await store.finished(uuid.uuid4())
    with pytest.raises(StorageFailed, match="NoSuchBucket; create the bucket"):
        await _put(store, uuid.uuid4(), _video(tmp_path))
    assert time.monotonic() - start < 0.9
    assert not await store.ping()


@pytest.mark.minio
@pytest.mark.parametrize("failing", ["poster.jpg", "meta.json"])
async def test_exhausted_retries_remove_the_partial_upload(
    store: ResultStore, raw: Minio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """When a later upload keeps failing, the objects already written are removed again."""
    job_id = uuid.uuid4()
    calls = _puts(monkeypatch, store, _s3_error(503, "ServiceUnavailable"), suffix=failing)
    with pytest.raises(StorageFailed, match=f"upload jobs/.*/{failing} failed with "):
        await _put(store, job_id, _video(tmp_path))
    assert calls.count(f"jobs/{job_id}/{failing}") == store.config.retries + 1
    assert not any(_exists(raw, store.config.bucket, key) for key in store.keys(job_id))
    assert await store.finished(job_id) is None


@pytest.mark.minio
async def test_a_failed_attempt_never_removes_an_earlier_finished_result(
    store: ResultStore, raw: Minio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second attempt that fails at meta.json leaves the first attempt's result in place."""
    job_id = uuid.uuid4()
    first = await _put(store, job_id, _video(tmp_path))
    _puts(monkeypatch, store, _s3_error(503, "SlowDown"), suffix="meta.json")
    with pytest.raises(StorageFailed):
        await _put(store, job_id, _video(tmp_path))
    assert all(_exists(raw, store.config.bucket, key) for key in store.keys(job_id))
    meta = await store.finished(job_id)
    assert meta is not None
    assert meta["result"]["sha256"] == first.sha256


async def test_outage_fails_fast_and_never_leaks_the_secret(tmp_path: Path) -> None:
    """With nothing listening, calls fail after the few retries allowed and name no secret."""
    secret = f"SECRET-{uuid.uuid4().hex}"
    config = StoreConfig(
        endpoint=f"127.0.0.1:{free_port()}",
        access_key="node",
        secret_key=secret,
        bucket="i2v-videos",
        region="us-east-1",
        retries=2,
        backoff_s=0.01,
    )
    store = ResultStore(config)
    start = time.monotonic()
    with pytest.raises(StorageFailed) as caught:
        await _put(store, uuid.uuid4(), _video(tmp_path))
    assert time.monotonic() - start < 3
    message = str(caught.value)
    assert "after 3 tries" in message
    assert config.endpoint in message
    full = "".join(traceback.format_exception(caught.value))
    assert secret not in full
    assert "Signature" not in full
    with pytest.raises(StorageFailed):
        await store.finished(uuid.uuid4())
    assert not await store.ping()
