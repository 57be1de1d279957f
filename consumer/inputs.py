"""A job's first frame as bytes, from whichever source the job names.

Owns the dispatch over `url` (the SSRF-safe fetcher), `s3` (the node's own store) and
`base64` (already capped by the schema). Must never open a URL or a file by itself.
"""

from __future__ import annotations

from i2v_fleet.schemas import Base64Image, ImageSource, S3Image, UrlImage

from .fetch import FetchPolicy, fetch_image
from .storage import ResultStore


async def image_bytes(source: ImageSource, policy: FetchPolicy, store: ResultStore) -> bytes:
    """The image file's bytes; raises ImageFetchFailed / ImageRejected with the reason."""
    if isinstance(source, UrlImage):
        return await fetch_image(source.url, policy)
    if isinstance(source, S3Image):
        return await store.get_image(source.s3.bucket, source.s3.key)
    if isinstance(source, Base64Image):
        return source.decode()
    raise TypeError(f"unknown image source {type(source).__name__}")  # pragma: no cover
