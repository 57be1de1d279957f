"""`JobRequest`, the message on `i2v.requests`, with its image sources and cache settings.

Owns validation of everything a submitter may send, and the normalisation of seed-era
spellings. Must never do I/O: images are checked for shape here and fetched by the node.

Over 400 lines, knowingly: one message's contract. Every field carries its description and
examples (the exported JSON Schema and AsyncAPI document describe themselves from them) and
every check names the bad value and the allowed range; cutting the image sources or the
cache settings into modules of their own would split one schema across files readers
open together.
"""

from __future__ import annotations

import binascii
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._base import Message, SafeText, SchemaVersion, Timestamp, safe_text, utcnow
from .presets import (
    DEFAULT_FPS,
    DEFAULT_NUM_FRAMES,
    DEFAULT_SAMPLE_SHIFT,
    MAX_NUM_FRAMES,
    MIN_NUM_FRAMES,
    PRESETS,
    ImageSize,
    QualityPreset,
    SampleSolver,
)

MAX_BASE64_IMAGE_BYTES = 1024 * 1024
"""Cap on an inline image, decoded. Larger images go by `url` or `s3` reference."""

MAX_BASE64_CHARS = 4 * ((MAX_BASE64_IMAGE_BYTES + 2) // 3)
MAX_URL_LENGTH = 2048
MAX_PROMPT_CHARS = 2000
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

NODE_LAYOUT_FIELDS: dict[str, str] = {
    "t5_fsdp": "T5_FSDP",
    "dit_fsdp": "DIT_FSDP",
    "ulysses_size": "ULYSSES_SIZE",
    "cfg_size": "CFG_SIZE",
    "vae_parallel": "VAE_PARALLEL",
    "t5_cpu": "T5_CPU",
}
"""Seed-era per-request layout knobs, now node settings (job field -> environment variable)."""

_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DATA_URL_PREFIX = re.compile(r"^data:image/[a-z0-9.+\-]+;base64,", re.IGNORECASE)


def _range(lo: float, hi: float) -> dict[str, Any]:
    return {"minimum": lo, "maximum": hi}


# ---------------------------------------------------------------------------------------
# Image sources: exactly one of {"url"}, {"s3": {...}}, {"base64"}.


class UrlImage(Message):
    """An image the node fetches over http(s), subject to the node's ALLOWED_HOSTS."""

    url: Annotated[
        str,
        Field(
            max_length=MAX_URL_LENGTH,
            description="http or https URL of a JPEG, PNG or WebP image.",
            examples=["https://example.com/cat.jpg"],
        ),
    ]

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme.lower() not in {"http", "https"}:
            raise ValueError(f"must be an http or https URL; got scheme {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("must name a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; use an s3 reference for private images")
        return value


class S3Object(Message):
    """A reference to an object in the node's own object store."""

    bucket: Annotated[
        str,
        Field(description="Bucket name (S3 naming rules).", examples=["uploads"]),
    ]
    key: Annotated[
        str,
        Field(min_length=1, max_length=1024, description="Object key.", examples=["in/cat.png"]),
    ]

    @field_validator("key")
    @classmethod
    def _plain_key(cls, value: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        if any(part in (".", "..") for part in value.split("/")):
            raise ValueError("must not have '.' or '..' path segments; give the object's key")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _S3_BUCKET.match(value):
            raise ValueError(
                "must be 3-63 characters of lowercase letters, digits, dots and hyphens"
            )
        return value


class S3Image(Message):
    """An image stored in the node's object store (MinIO)."""

    s3: Annotated[S3Object, Field(description="Where the image is stored.")]


class Base64Image(Message):
    """An image sent inline. Capped at 1 MiB decoded; a `data:` URL prefix is accepted."""

    base64: Annotated[
        str,
        Field(
            description="Standard base64 of a JPEG, PNG or WebP file (at most 1 MiB decoded).",
            examples=["iVBORw0KGgo..."],
        ),
    ]

    @field_validator("base64", mode="before")
    @classmethod
    def _strip_data_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _DATA_URL_PREFIX.sub("", value.strip(), count=1)
        return value

    @field_validator("base64")
    @classmethod
    def _decodable_and_capped(cls, value: str) -> str:
        too_big = ValueError(
            f"inline image is over the {MAX_BASE64_IMAGE_BYTES // 1024} KiB cap; "
            "send it by url or s3 reference instead"
        )
        if len(value) > MAX_BASE64_CHARS:  # refuse before decoding anything large
            raise too_big
        try:
            decoded = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid standard base64") from None
        if not decoded:
            raise ValueError("is empty")
        if len(decoded) > MAX_BASE64_IMAGE_BYTES:
            raise too_big
        return value

    def decode(self) -> bytes:
        """The image file's bytes."""
        return binascii.a2b_base64(self.base64)


def _image_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        present = [k for k in ("url", "s3", "base64") if k in value]
        return present[0] if len(present) == 1 else None
    kinds: dict[type, str] = {UrlImage: "url", S3Image: "s3", Base64Image: "base64"}
    return kinds.get(type(value))


ImageSource = Annotated[
    Annotated[UrlImage, Tag("url")]
    | Annotated[S3Image, Tag("s3")]
    | Annotated[Base64Image, Tag("base64")],
    Discriminator(
        _image_kind,
        custom_error_type="image_source",
        custom_error_message="image must be an object with exactly one of 'url', 's3', 'base64'",
    ),
]


# ---------------------------------------------------------------------------------------
# Caches.


class AttentionCache(Message):
    """Reuse each block's self-attention output between refresh steps.

    On steps in (start_step, end_step] that are not a multiple of `interval` after
    `start_step`, every transformer block reuses the self-attention output it computed
    on the last refresh step; cross-attention and the FFN always run.
    """

    kind: Annotated[Literal["attention"], Field(description="Cache kind.")] = "attention"
    start_step: Annotated[
        int,
        Field(description="Last step before reuse begins.", json_schema_extra=_range(0, 100)),
    ] = 12
    interval: Annotated[
        int,
        Field(description="Refresh every this many steps.", json_schema_extra=_range(1, 100)),
    ] = 4
    end_step: Annotated[
        int,
        Field(description="Last step that may reuse.", json_schema_extra=_range(1, 100)),
    ] = 37

    @field_validator("start_step", "interval", "end_step")
    @classmethod
    def _in_range(cls, value: int, info: ValidationInfo) -> int:
        return _check_range(cls, value, info)

    @model_validator(mode="after")
    def _ordered(self) -> AttentionCache:
        if self.start_step >= self.end_step:
            raise ValueError(
                f"cache.start_step ({self.start_step}) must be below cache.end_step "
                f"({self.end_step})"
            )
        return self


class FirstBlockCache(Message):
    """Skip the remaining blocks when the first block's output barely changed (diffusers)."""

    kind: Annotated[Literal["first_block"], Field(description="Cache kind.")] = "first_block"
    threshold: Annotated[
        float,
        Field(
            description="Relative change of the first block's residual below which to skip.",
            json_schema_extra=_range(0.001, 1.0),
        ),
    ] = 0.05

    @field_validator("threshold")
    @classmethod
    def _in_range(cls, value: float, info: ValidationInfo) -> float:
        return _check_range(cls, value, info)


class NoCache(Message):
    """Run every step in full, even where the node enables a cache by default."""

    kind: Annotated[Literal["none"], Field(description="Cache kind.")] = "none"


CacheConfig = Annotated[
    AttentionCache | FirstBlockCache | NoCache,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------------------
# The job.


class SamplingParams(Message):
    """The sampling settings a job resolves to once its preset is applied."""

    infer_steps: int
    guidance_scale: float
    sample_solver: SampleSolver
    sample_shift: float


class JobRequest(Message):
    """One image-to-video job. `job_id` is the idempotency key: resubmitting it is safe."""

    schema_version: SchemaVersion = 1
    job_id: Annotated[
        UUID,
        Field(
            description="Client-made UUID; the idempotency key and the Kafka record key.",
            examples=["3f2b8c1e-1d2a-4c55-9d7e-0b1f2a3c4d5e"],
        ),
    ]
    prompt: Annotated[
        SafeText,
        Field(
            min_length=1,
            max_length=MAX_PROMPT_CHARS,
            description="What should happen in the video.",
            examples=["A cat walks along a sunlit windowsill, camera slowly panning"],
        ),
    ]
    negative_prompt: Annotated[
        SafeText,
        Field(
            max_length=MAX_PROMPT_CHARS,
            description="What to avoid. Empty uses the model's default negative prompt.",
            examples=["blurry, low quality, watermark"],
        ),
    ] = ""
    image: Annotated[
        ImageSource,
        Field(
            description="The first frame: exactly one of url, s3 or base64.",
            examples=[{"url": "https://example.com/cat.jpg"}],
        ),
    ]
    quality_preset: Annotated[
        QualityPreset,
        Field(
            description=(
                "fast (20 steps, cfg 2.5, unipc), balanced (30, 3.0, unipc), high (50, 4.0, "
                "dpm++), custom (the job gives infer_steps and guidance_scale), or turbo (4, "
                "1.0, euler; only on nodes with step/CFG-distilled weights, which serve "
                "nothing else). Explicit advanced fields override the preset."
            ),
            examples=["balanced"],
        ),
    ] = QualityPreset.BALANCED
    image_size: Annotated[
        ImageSize,
        Field(
            description=(
                "Output width*height. 1024*576 and 1920*1080 are outside the model's "
                "training sizes: they work, with weaker motion and detail."
            ),
            examples=["1280*720"],
        ),
    ] = ImageSize.LANDSCAPE_720P
    num_frames: Annotated[
        int,
        Field(
            description="Frames to generate: 4n+1 between 5 and 121 (81 is 5 s at 16 fps).",
            json_schema_extra=_range(MIN_NUM_FRAMES, MAX_NUM_FRAMES),
            examples=[81],
        ),
    ] = DEFAULT_NUM_FRAMES
    guidance_scale: Annotated[
        float | None,
        Field(
            description="Classifier-free guidance scale; default from the preset.",
            json_schema_extra=_range(1.0, 20.0),
            examples=[3.0],
        ),
    ] = None
    infer_steps: Annotated[
        int | None,
        Field(
            description="Denoising steps; default from the preset.",
            json_schema_extra=_range(1, 100),
            examples=[30],
        ),
    ] = None
    seed: Annotated[
        int | None,
        Field(
            description="Random seed for reproducible output; -1 or absent picks one.",
            json_schema_extra=_range(0, 2**31 - 1),
            examples=[42],
        ),
    ] = None
    sample_solver: Annotated[
        SampleSolver | None,
        Field(
            description=(
                "unipc, dpm++ (alias dpmpp) or euler (for distilled weights); default from "
                "the preset."
            )
        ),
    ] = None
    sample_shift: Annotated[
        float | None,
        Field(
            description=f"Flow-matching shift; default {DEFAULT_SAMPLE_SHIFT}.",
            json_schema_extra=_range(0.1, 20.0),
            examples=[5.0],
        ),
    ] = None
    fps: Annotated[
        int,
        Field(
            description="Frame rate of the MP4.",
            json_schema_extra=_range(1, 60),
            examples=[16],
        ),
    ] = DEFAULT_FPS
    cache: Annotated[
        CacheConfig | None,
        Field(
            description=(
                "Step cache: attention (reuse self-attention between refresh steps), "
                "first_block, or none. Absent uses the node's default."
            ),
            examples=[{"kind": "attention", "start_step": 12, "interval": 4, "end_step": 37}],
        ),
    ] = None
    timeout_s: Annotated[
        int | None,
        Field(
            description="Run-time limit in seconds; absent uses the node's TASK_TIMEOUT.",
            json_schema_extra=_range(1, 86400),
            examples=[1800],
        ),
    ] = None
    ttl_s: Annotated[
        int | None,
        Field(
            description="Longest wait in the queue, in seconds, before the job expires.",
            json_schema_extra=_range(1, 7 * 86400),
            examples=[3600],
        ),
    ] = None
    metadata: Annotated[
        dict[str, str],
        Field(
            description="Small string map echoed in every event of the job.",
            examples=[{"tenant": "acme", "trace_id": "abc123"}],
        ),
    ] = Field(default_factory=dict)
    submitted_at: Annotated[Timestamp, Field(description="When the client submitted the job.")] = (
        Field(default_factory=utcnow)
    )
    attempt: Annotated[
        int,
        Field(
            description="1 when submitted; re-publications carry the next number.",
            json_schema_extra=_range(1, 100),
            examples=[1],
        ),
    ] = 1

    # -- normalisation -------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        refused = [name for name in NODE_LAYOUT_FIELDS if name in data]
        if refused:
            names = ", ".join(f"{n!r} (set {NODE_LAYOUT_FIELDS[n]})" for n in refused)
            raise ValueError(
                f"node layout settings are not job fields: {names} on the worker nodes; "
                "a loaded, sharded model cannot change layout per job"
            )
        data = dict(data)
        if "image_url" in data:
            if "image" in data:
                raise ValueError("give either image or the older image_url, not both")
            data["image"] = {"url": data.pop("image_url")}
        seed_cache = {
            k: data.pop(k)
            for k in ("use_attentioncache", "start_step", "attentioncache_interval", "end_step")
            if k in data
        }
        if seed_cache.get("use_attentioncache"):
            if data.get("cache") is not None:
                raise ValueError("give either cache or the older use_attentioncache, not both")
            cache: dict[str, Any] = {"kind": "attention"}
            for old, new in (
                ("start_step", "start_step"),
                ("attentioncache_interval", "interval"),
                ("end_step", "end_step"),
            ):
                if old in seed_cache:
                    cache[new] = seed_cache[old]
            data["cache"] = cache
        if isinstance(data.get("image_size"), str):
            data["image_size"] = data["image_size"].strip().replace("x", "*").replace("X", "*")
        if data.get("seed") == -1:
            data["seed"] = None
        return data

    # -- checks --------------------------------------------------------------------

    @field_validator(
        "num_frames",
        "guidance_scale",
        "infer_steps",
        "seed",
        "sample_shift",
        "fps",
        "timeout_s",
        "ttl_s",
        "attempt",
    )
    @classmethod
    def _in_range(cls, value: _N | None, info: ValidationInfo) -> _N | None:
        return None if value is None else _check_range(cls, value, info)

    @field_validator("num_frames")
    @classmethod
    def _four_n_plus_one(cls, value: int) -> int:
        if value % 4 != 1:
            raise ValueError(
                f"must be 4n+1 between {MIN_NUM_FRAMES} and {MAX_NUM_FRAMES} "
                f"(for example 41, 61, 81); got {value}"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        return check_metadata(value)

    @model_validator(mode="after")
    def _custom_preset_complete(self) -> JobRequest:
        if self.quality_preset is QualityPreset.CUSTOM:
            missing = [f for f in ("infer_steps", "guidance_scale") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"quality_preset 'custom' needs {' and '.join(missing)}; "
                    "or pick fast, balanced or high"
                )
        return self

    # -- derived -------------------------------------------------------------------

    def sampling(self) -> SamplingParams:
        """Steps, guidance, solver and shift after applying the preset and overrides."""
        base = PRESETS.get(self.quality_preset, PRESETS[QualityPreset.BALANCED])
        return SamplingParams(
            infer_steps=self.infer_steps if self.infer_steps is not None else base.infer_steps,
            guidance_scale=(
                self.guidance_scale if self.guidance_scale is not None else base.guidance_scale
            ),
            sample_solver=self.sample_solver or base.sample_solver,
            sample_shift=(
                self.sample_shift if self.sample_shift is not None else DEFAULT_SAMPLE_SHIFT
            ),
        )

    @property
    def expires_at(self) -> datetime | None:
        """When a queued job stops being worth starting (`ttl_s` after submission)."""
        return None if self.ttl_s is None else self.submitted_at + timedelta(seconds=self.ttl_s)

    @property
    def key(self) -> bytes:
        """The Kafka record key of this job on every topic."""
        return str(self.job_id).encode()


_N = TypeVar("_N", int, float)


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """`value` if it is small enough to echo in every event of a job, else `ValueError`."""
    if len(value) > MAX_METADATA_ENTRIES:
        raise ValueError(f"must have at most {MAX_METADATA_ENTRIES} entries; got {len(value)}")
    for key, item in value.items():
        shown = safe_text(key, 40)
        if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
            raise ValueError(
                f"keys must be 1-{MAX_METADATA_KEY_CHARS} characters; got {shown!r} "
                f"({len(key)} characters)"
            )
        if len(item) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(
                f"value of {shown!r} must be at most {MAX_METADATA_VALUE_CHARS} characters"
            )
    return value


def _check_range(model: type[Message], value: _N, info: ValidationInfo) -> _N:
    assert info.field_name is not None
    extra = model.model_fields[info.field_name].json_schema_extra
    assert isinstance(extra, dict)
    lo, hi = extra["minimum"], extra["maximum"]
    assert isinstance(lo, (int, float))
    assert isinstance(hi, (int, float))
    if not lo <= value <= hi:
        raise ValueError(f"must be between {lo} and {hi}; got {value}")
    return value
