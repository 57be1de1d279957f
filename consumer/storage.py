"""The node's object store: results under `jobs/<job_id>/` and `s3` image references, in MinIO.

Owns the result keys, the upload order (a `meta.json`, written last, means finished), retries
and the mapping of S3 failures to job errors. Must never block the event loop, and never put a
secret key, a signature or a presigned query string into an error message.

Over 400 lines: the store's error mapping (transient, refused, missing, TLS) is one table
read by every call, and splitting results from image references would duplicate it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import random
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from uuid import UUID

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json
from urllib3.exceptions import HTTPError, LocationValueError, SSLError

from i2v_fleet.connection import ObjectStoreSettings
from i2v_fleet.schemas import JobResult, safe_text, utcnow

from .errors import ImageFetchFailed, StorageFailed

__all__ = [
    "JOBS_PREFIX",
    "MAX_PRESIGN_EXPIRY_S",
    "RETENTION_RULE_ID",
    "ResultKeys",
    "ResultStore",
    "StoreConfig",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
"""S3 (SigV4) refuses presigned URLs that live longer than 7 days."""

RETENTION_RULE_ID = "i2v-expire-jobs"
"""The id of our lifecycle rule; rules with other ids belong to operators and are kept."""

JOBS_PREFIX = "jobs/"
_META_LIMIT = 1024 * 1024  # a meta.json bigger than this was not written by us

# S3 error codes that mean "try again"; any 5xx or 429 status counts too.
_TRANSIENT_CODES = frozenset(
    {"InternalError", "OperationAborted", "RequestLimitExceeded", "RequestTimeout"}
    | {"ServiceUnavailable", "SlowDown", "Throttling", "TooManyRequests"}
)
_HINTS = {
    "AccessDenied": "check MINIO_ACCESS_KEY, MINIO_SECRET_KEY and the bucket policy",
    "InvalidAccessKeyId": "check MINIO_ACCESS_KEY",
    "SignatureDoesNotMatch": "check MINIO_SECRET_KEY",
    "NoSuchBucket": "create the bucket (the node does at start) or fix MINIO_BUCKET",
}
# What the SDK and its transport raise for store trouble; anything else is our bug and escapes.
_STORE_ERRORS = (MinioException, HTTPError, OSError)
# The submitter named something that is not there: their error, not the store's.
_IMAGE_MISSING = ("NoSuchKey", "NoSuchBucket")
# The submitter named something the node may not or cannot read: also theirs to change.
_IMAGE_REFUSED = {
    "AccessDenied": "give the node's access key read access to it, or upload it elsewhere",
    "AllAccessDisabled": "the bucket is closed to all access; upload the image elsewhere",
    "InvalidBucketName": "give a valid bucket name",
    "InvalidObjectName": "give a valid object key",
    "KeyTooLongError": "give a key of at most 1024 bytes",
    "InvalidObjectState": "the object is archived; restore it or upload a copy",
    "InvalidRange": "upload the image again",
}
_JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """How to reach the store and how patiently. Built once at the process edge, from the
    MINIO_* settings (`from_settings`): the connection fields below are theirs, resolved."""

    endpoint: str
    """host:port, no scheme."""
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    secure: bool = False
    ca_file: str | None = None
    """PEM bundle of the CAs that may sign the store's certificate (MINIO_CA_FILE); None
    trusts the system's CAs."""
    region: str | None = None
    presign_expiry_s: int = MAX_PRESIGN_EXPIRY_S
    """Clamped to 1 s .. 7 days."""
    retention_days: int | None = None
    """Expire `jobs/` after this many days (OUTPUT_RETENTION_DAYS); None leaves lifecycle alone."""
    retries: int = 5
    """Retries after the first try of each call, for transient failures only."""
    backoff_s: float = 0.5
    backoff_cap_s: float = 8.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0
    ping_timeout_s: float = 2.0
    max_image_bytes: int = 20 * 1024 * 1024

    def __post_init__(self) -> None:
        clamped = min(max(self.presign_expiry_s, 1), MAX_PRESIGN_EXPIRY_S)
        object.__setattr__(self, "presign_expiry_s", clamped)
        if self.retries < 0 or self.backoff_s < 0 or self.max_image_bytes < 1:
            raise ValueError("retries and backoff_s must be >= 0 and max_image_bytes >= 1")
        if self.retention_days is not None and self.retention_days < 1:
            raise ValueError(f"retention_days must be at least 1; got {self.retention_days}")

    @classmethod
    def from_settings(cls, store: ObjectStoreSettings, **patience: Any) -> StoreConfig:
        """The store that MINIO_* names; `patience` sets the other fields (presign_expiry_s,
        retention_days, retries, timeouts, ...)."""
        return cls(
            endpoint=store.endpoint,
            access_key=store.access_key,
            secret_key=store.secret_key.get_secret_value(),
            bucket=store.bucket,
            secure=store.secure,
            ca_file=store.ca_file or None,
            region=store.region,
            **patience,
        )


class ResultKeys(NamedTuple):
    """Where a job's result lives; depends only on the job id, so attempts overwrite."""

    video: str
    poster: str
    meta: str


class ResultStore:
    """Results and image references in one S3 store. Every I/O method is async and retries."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._client = _minio(config, config.connect_timeout_s, config.read_timeout_s)
        self._ping_client = _minio(config, config.ping_timeout_s, config.ping_timeout_s)

    @staticmethod
    def keys(job_id: UUID) -> ResultKeys:
        prefix = f"{JOBS_PREFIX}{job_id}/"
        return ResultKeys(f"{prefix}video.mp4", f"{prefix}poster.jpg", f"{prefix}meta.json")

    async def ensure_bucket(self) -> None:
        """Create the bucket if missing and, when `retention_days` is set, our expiry rule."""
        bucket = self.config.bucket
        if not await self._call(
            f"check bucket {bucket}", lambda: self._client.bucket_exists(bucket)
        ):
            await self._call(f"create bucket {bucket}", self._make_bucket)
        if self.config.retention_days is not None:
            await self._call(f"set the lifecycle of {bucket}", self._put_retention_rule)

    async def finished(self, job_id: UUID) -> dict[str, Any] | None:
        """The `meta.json` of an attempt that finished, or None (absent or corrupt)."""
        key = self.keys(job_id).meta
        bucket = self.config.bucket
        data = await self._call(
            f"read {key}", lambda: _or_none(lambda: self._read(bucket, key, _META_LIMIT))
        )
        if data is None:
            return None
        try:
            meta = _JSON_OBJECT.validate_json(data)
            JobResult.model_validate(meta.get("result"))
        except ValidationError:
            # A half-written or foreign file must not make us skip the job: run it again.
            log.warning("%s is not a valid result; treating job %s as not finished", key, job_id)
            return None
        return meta

    async def reissue(self, meta: Mapping[str, Any]) -> JobResult:
        """The result stored in `meta` (from `finished`) with a fresh presigned URL."""
        stored = JobResult.model_validate(meta["result"])
        url, expires_at = await self._presign(stored.bucket, stored.key)
        return stored.model_copy(update={"url": url, "url_expires_at": expires_at})

    async def put_result(
        self,
        job_id: UUID,
        video_path: Path,
        poster: bytes,
        meta: Mapping[str, Any],
        *,
        width: int,
        height: int,
        num_frames: int,
        fps: int,
        timings: Mapping[str, float],
        on_video_stored: Callable[[], None] | None = None,
    ) -> JobResult:
        """Upload video, poster and then `meta.json` (your meta plus `result`); return the result.

        On failure, removes what this attempt wrote unless a `meta.json` is there (an earlier
        finished result, or ours that landed despite the error), then raises `StorageFailed`.
        """
        bucket, keys = self.config.bucket, self.keys(job_id)
        sha256, size = await asyncio.to_thread(_digest, video_path)
        # Presigning needs no object yet; doing it first means nothing is uploaded on failure.
        url, expires_at = await self._presign(bucket, keys.video)
        result = JobResult(
            bucket=bucket,
            key=keys.video,
            url=url,
            url_expires_at=expires_at,
            poster_key=keys.poster,
            size_bytes=size,
            sha256=sha256,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=fps,
            timings=dict(timings),
        )
        document = to_json({**meta, "result": result.model_dump(mode="json")})
        written: list[str] = []
        try:
            # Recorded before each call: a timed-out upload may still have landed.
            written.append(keys.video)
            await self._call(
                f"upload {keys.video}",
                lambda: self._client.fput_object(
                    bucket, keys.video, str(video_path), content_type="video/mp4"
                ),
            )
            if on_video_stored is not None:
                on_video_stored()
            written.append(keys.poster)
            await self._call(
                f"upload {keys.poster}", lambda: self._put(keys.poster, poster, "image/jpeg")
            )
            await self._call(
                f"upload {keys.meta}", lambda: self._put(keys.meta, document, "application/json")
            )
        except StorageFailed:
            await self._discard(keys, written)
            raise
        return result

    async def get_image(self, bucket: str, key: str) -> bytes:
        """The bytes of an `s3` image reference in this store, at most `max_image_bytes`."""
        where = f"s3://{bucket}/{safe_text(key, 200)}"
        cap = self.config.max_image_bytes
        stat = await self._call(
            f"stat {where}",
            lambda: _image_op(where, lambda: self._client.stat_object(bucket, key)),
        )
        if stat is None:
            raise _missing(where)
        if (stat.size or 0) > cap:
            raise _too_big(where, cap, stat.size)
        data = await self._call(
            f"download {where}",
            lambda: _image_op(where, lambda: self._read(bucket, key, cap)),
        )
        if data is None:  # deleted after the stat
            raise _missing(where)
        if len(data) > cap:  # replaced by a bigger object after the stat
            raise _too_big(where, cap)
        return data

    async def ping(self) -> bool:
        """True when the store answers within `ping_timeout_s` and the bucket exists. No retries."""
        try:
            return bool(
                await asyncio.to_thread(self._ping_client.bucket_exists, self.config.bucket)
            )
        except _STORE_ERRORS:
            return False

    # -- internals ---------------------------------------------------------------------

    async def _call(self, op: str, fn: Callable[[], T]) -> T:
        """Run a blocking SDK call in a thread, retrying transient failures with backoff."""
        attempt = 1
        while True:
            try:
                return await asyncio.to_thread(fn)
            except _STORE_ERRORS as exc:
                if not _transient(exc) or attempt > self.config.retries:
                    raise StorageFailed(self._describe(op, exc, attempt)) from exc
                # Full jitter: nodes that lost the store together must not return together.
                ceiling = min(self.config.backoff_cap_s, self.config.backoff_s * 2 ** (attempt - 1))
                delay = random.uniform(0, ceiling)
                log.warning(
                    "object store: %s failed with %s (try %d); retrying in %.2f s",
                    op,
                    _reason(exc),
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1

    def _describe(self, op: str, exc: BaseException, tries: int) -> str:
        code = str(exc.code) if isinstance(exc, S3Error) else ""
        if code in _HINTS:
            hint = _HINTS[code]
        elif _tls_refused(exc) is not None:
            hint = (
                "check MINIO_CA_FILE: it must name the PEM bundle of the CA that signed the "
                f"certificate of {self.config.endpoint} (empty: the system's CAs)"
            )
        elif _transient(exc):
            hint = f"check that the object store at {self.config.endpoint} is up and reachable"
        else:
            hint = "check the object store settings (MINIO_*)"
        after = f" after {tries} tries" if tries > 1 else ""
        return f"object store: {op} failed with {_reason(exc)}{after}; {hint}"

    async def _presign(self, bucket: str, key: str) -> tuple[str, datetime]:
        expiry = timedelta(seconds=self.config.presign_expiry_s)
        # Whole seconds, taken before signing: X-Amz-Date is truncated to the second, so the
        # URL never dies before the time we announce.
        expires_at = utcnow().replace(microsecond=0) + expiry
        url = await self._call(
            f"presign {key}",
            lambda: self._client.presigned_get_object(bucket, key, expires=expiry),
        )
        return str(url), expires_at

    def _make_bucket(self) -> None:
        try:
            self._client.make_bucket(self.config.bucket, location=self.config.region)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # another node won the race: fine
                raise

    def _put_retention_rule(self) -> None:
        days, bucket = self.config.retention_days, self.config.bucket
        current = self._client.get_bucket_lifecycle(bucket)
        rules = list(current.rules) if current is not None else []
        ours = [r for r in rules if r.rule_id == RETENTION_RULE_ID]
        if len(ours) == 1 and _expires_jobs_after(ours[0], days):
            return  # already right: no write, so restarts of many nodes cause no churn
        rule = Rule(
            ENABLED,
            rule_filter=Filter(prefix=JOBS_PREFIX),
            rule_id=RETENTION_RULE_ID,
            expiration=Expiration(days=days),
        )
        others = [r for r in rules if r.rule_id != RETENTION_RULE_ID]
        self._client.set_bucket_lifecycle(bucket, LifecycleConfig([*others, rule]))

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(
            self.config.bucket, key, io.BytesIO(data), len(data), content_type=content_type
        )

    def _read(self, bucket: str, key: str, limit: int) -> bytes:
        """At most `limit + 1` bytes, so the caller can tell "too big" without reading it all."""
        response = self._client.get_object(bucket, key)
        try:
            return bytes(response.read(limit + 1))
        finally:
            response.close()
            response.release_conn()

    async def _discard(self, keys: ResultKeys, written: Collection[str]) -> None:
        """Best effort: remove a failed attempt's uploads unless a `meta.json` claims them."""
        bucket = self.config.bucket
        try:
            meta = await asyncio.to_thread(
                lambda: _or_none(lambda: self._client.stat_object(bucket, keys.meta))
            )
        except _STORE_ERRORS as exc:
            # Unknown state: a leftover video is harmless (not finished, overwritten by the
            # next attempt, expired by lifecycle); deleting a finished job's video is not.
            log.warning("object store: left %s in place (%s)", ", ".join(written), _reason(exc))
            return
        if meta is not None:
            return
        for key in written:
            try:
                await asyncio.to_thread(self._client.remove_object, bucket, key)
            except _STORE_ERRORS as exc:
                log.warning("object store: could not remove %s (%s)", key, _reason(exc))


def _minio(config: StoreConfig, connect_s: float, read_s: float) -> Minio:
    # No urllib3 retries (minio's default pool retries 5 times): an outage must fail within
    # one timeout into our own backoff, which logs and is bounded by `retries`.
    # Certificates are always verified: against `ca_file` when given, else the system's CAs.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_s, read=read_s),
        retries=False,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=config.ca_file,
    )
    return Minio(
        config.endpoint,
        access_key=config.access_key,
        secret_key=config.secret_key,
        secure=config.secure,
        region=config.region,
        http_client=http,
    )


def _or_none(fn: Callable[[], T], missing: Collection[str] = ("NoSuchKey",)) -> T | None:
    """`fn()`, or None when S3 answers with one of the `missing` codes."""
    try:
        return fn()
    except S3Error as exc:
        if exc.code in missing:
            return None
        raise


def _digest(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _status(exc: BaseException) -> int:
    if isinstance(exc, S3Error):
        return int(exc.response.status)
    if isinstance(exc, ServerError):
        return int(exc.status_code)
    if isinstance(exc, InvalidResponseError):
        return int(getattr(exc, "_code", 0) or 0)  # the SDK keeps the status private
    return 0


def _tls_refused(exc: BaseException) -> BaseException | None:
    """The cause when TLS failed because of our trust settings, not the network: the
    certificate could not be verified, or the CA file could not be read. None otherwise."""
    if not isinstance(exc, SSLError):
        return None
    # urllib3 wraps the ssl (or, for an unreadable CA file, the OS) error it got.
    for cause in (*exc.args, exc.__cause__, exc.__context__):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
            return cause
    return None


def _transient(exc: BaseException) -> bool:
    if _tls_refused(exc) is not None:
        return False  # the same certificate and CA file fail the same way next time
    if isinstance(exc, S3Error) and exc.code in _TRANSIENT_CODES:
        return True
    if isinstance(exc, MinioException):
        status = _status(exc)
        return status >= 500 or status == 429
    if isinstance(exc, HTTPError):
        return not isinstance(exc, LocationValueError)  # a malformed endpoint stays malformed
    return isinstance(exc, (ConnectionError, TimeoutError))


def _reason(exc: BaseException) -> str:
    # Built from codes and class names only: SDK messages may carry request paths.
    if isinstance(exc, S3Error) and exc.code:
        return str(exc.code)
    cause = _tls_refused(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        # OpenSSL's reason names the certificate problem and at most the host we dialled.
        return f"a TLS certificate that could not be verified ({cause.verify_message})"
    if cause is not None:
        return f"a CA file that could not be read ({type(cause).__name__})"
    if status := _status(exc):
        return f"HTTP {status}"
    return type(exc).__name__


def _expires_jobs_after(rule: Rule, days: int | None) -> bool:
    return bool(
        rule.status == ENABLED
        and rule.rule_filter is not None
        and rule.rule_filter.prefix == JOBS_PREFIX
        and rule.expiration is not None
        and rule.expiration.days == days
    )


def _image_op(where: str, fn: Callable[[], T]) -> T | None:
    """`fn()` on a job's image reference: None when the object is not there, and
    `ImageFetchFailed` when the reference itself is at fault (a key the SDK refuses, a
    bucket or object the node may not read). The store's own trouble passes through."""
    try:
        return fn()
    except S3Error as exc:
        if exc.code in _IMAGE_MISSING:
            return None
        if exc.code in _IMAGE_REFUSED:
            raise ImageFetchFailed(
                f"image {where} cannot be read by the node ({exc.code}); "
                f"{_IMAGE_REFUSED[str(exc.code)]}"
            ) from None
        raise
    except ValueError as exc:  # the SDK refuses some names before sending anything
        raise ImageFetchFailed(
            f"image {where} is not a valid object reference ({safe_text(str(exc), 120)}); "
            "give a plain bucket name and key"
        ) from None


def _missing(where: str) -> ImageFetchFailed:
    return ImageFetchFailed(
        f"image {where} does not exist in the node's object store; "
        "upload it there or fix the bucket and key"
    )


def _too_big(where: str, cap: int, size: int | None = None) -> ImageFetchFailed:
    # The same code as an oversized URL download (consumer.fetch), whatever the source.
    mib = 1024 * 1024
    found = f" ({size / mib:.1f} MiB)" if size is not None else ""
    return ImageFetchFailed(
        f"image {where}{found} is larger than the limit of {cap / mib:.1f} MiB; "
        "upload a smaller or more compressed image"
    )
