"""JobRequest: valid jobs round-trip, invalid ones are refused naming the field."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from i2v_fleet.schemas import (
    JOB_REQUEST_ADAPTER,
    MAX_BASE64_IMAGE_BYTES,
    AttentionCache,
    ImageSize,
    JobRequest,
    QualityPreset,
    SampleSolver,
    UrlImage,
    describe_validation_error,
)
from tests.schemas.strategies import job_requests


def _minimal(**extra: Any) -> dict[str, Any]:
    return {
        "job_id": str(uuid.uuid4()),
        "prompt": "a cat",
        "image": {"url": "https://x.io/a.png"},
        **extra,
    }


def _refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        JOB_REQUEST_ADAPTER.validate_python(data)
    return describe_validation_error(info.value)


@given(job_requests())
def test_valid_requests_round_trip_through_json_unchanged(data: dict[str, Any]) -> None:
    """Any valid request, encoded and decoded, is equal to itself and re-encodes identically."""
    request = JOB_REQUEST_ADAPTER.validate_python(data)
    wire = request.model_dump_json()
    again = JOB_REQUEST_ADAPTER.validate_json(wire)
    assert again == request
    assert again.model_dump_json() == wire


# (field, bad value, words the refusal must contain besides the field name)
MUTATIONS: list[tuple[str, Any, str]] = [
    ("job_id", "not-a-uuid", "valid UUID"),
    ("prompt", "", "at least 1"),
    ("prompt", "x" * 2001, "at most 2000"),
    ("prompt", "bell\x07", "control"),
    ("image", {}, "exactly one of 'url', 's3', 'base64'"),
    ("image", {"url": "https://a.io/x.png", "base64": "aGk="}, "exactly one"),
    ("image", {"url": "ftp://a.io/x.png"}, "http or https"),
    ("image", {"url": "https://user:pw@a.io/x.png"}, "credentials"),
    ("image", {"s3": {"bucket": "Bad_Bucket", "key": "k"}}, "lowercase"),
    ("image", {"s3": {"bucket": "uploads", "key": "a/../b.png"}}, "'..' path segments"),
    ("image", {"s3": {"bucket": "uploads", "key": "a\x00b"}}, "control"),
    ("metadata", {"k" * 3000: "v"}, "3000 characters"),
    ("image", {"base64": "not base64!!"}, "base64"),
    ("quality_preset", "ultra", "'fast', 'balanced', 'high', 'custom' or 'turbo'"),
    ("image_size", "640*360", "'1280*720'"),
    ("num_frames", 80, "4n+1 between 5 and 121"),
    ("num_frames", 125, "between 5 and 121"),
    ("num_frames", 1, "between 5 and 121"),
    ("guidance_scale", 0.5, "between 1.0 and 20.0"),
    ("guidance_scale", 21, "between 1.0 and 20.0"),
    ("infer_steps", 0, "between 1 and 100"),
    ("infer_steps", 101, "between 1 and 100"),
    ("seed", 2**31, "between 0 and 2147483647"),
    ("seed", -5, "between 0 and 2147483647"),
    ("sample_solver", "heun", "'unipc', 'dpm++' or 'euler'"),
    ("sample_shift", 0, "between 0.1 and 20.0"),
    ("fps", 0, "between 1 and 60"),
    ("fps", 61, "between 1 and 60"),
    ("cache", {"kind": "attention", "interval": 0}, "between 1 and 100"),
    ("cache", {"kind": "attention", "start_step": 30, "end_step": 20}, "below"),
    ("cache", {"kind": "teacache"}, "attention"),
    ("timeout_s", 0, "between 1 and 86400"),
    ("ttl_s", 10**9, "between 1 and 604800"),
    ("metadata", {f"k{i}": "v" for i in range(40)}, "at most 32"),
    ("metadata", {"k": "v" * 600}, "at most 512"),
    ("attempt", 0, "between 1 and 100"),
    ("unknown_field", 1, "not permitted"),
]


@given(job_requests(), st.sampled_from(MUTATIONS))
def test_mutated_requests_are_refused_naming_the_field(
    data: dict[str, Any], mutation: tuple[str, Any, str]
) -> None:
    """One bad field makes the request invalid, and the message names it and the limit."""
    field, value, words = mutation
    message = _refusal({**data, field: value})
    assert message.startswith(field) or f"; {field}" in message or f"{field}." in message
    assert words in message


def test_refusals_fit_an_error_message_whatever_the_input() -> None:
    """Names and keys from the input are escaped and cut, so the refusal itself is valid."""
    from i2v_fleet.schemas import ErrorCode, ErrorInfo

    hostile = _minimal(metadata={"\x1b[31m" * 500: "v"}) | {"\x00" + "n" * 9000: 1}
    message = _refusal(hostile)
    assert "\x1b" not in message
    assert "\x00" not in message
    assert len(message) <= 2000
    ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=message)


def test_messages_never_echo_the_input() -> None:
    """A refused base64 image is not repeated back in the error message."""
    secret = base64.b64encode(b"x" * 10).decode() + "@@"
    assert secret not in _refusal(_minimal(image={"base64": secret}))


def test_seed_era_spellings_are_normalised() -> None:
    """image_url, use_attentioncache and friends, dpmpp and 832x480 map onto the new fields."""
    request = JOB_REQUEST_ADAPTER.validate_python(
        {
            "job_id": str(uuid.uuid4()),
            "prompt": "a cat",
            "image_url": "https://x.io/a.png",
            "use_attentioncache": True,
            "start_step": 10,
            "attentioncache_interval": 3,
            "end_step": 30,
            "sample_solver": "dpmpp",
            "image_size": "832x480",
            "seed": -1,
        }
    )
    assert request.image == UrlImage(url="https://x.io/a.png")
    assert request.cache == AttentionCache(start_step=10, interval=3, end_step=30)
    assert request.sample_solver is SampleSolver.DPMPP
    assert request.image_size is ImageSize.LANDSCAPE_480P
    assert request.seed is None


def test_seed_cache_knobs_without_the_switch_leave_the_cache_off() -> None:
    """start_step and friends alone, with use_attentioncache false, enable nothing."""
    request = JOB_REQUEST_ADAPTER.validate_python(
        _minimal(use_attentioncache=False, start_step=5, end_step=9)
    )
    assert request.cache is None


@pytest.mark.parametrize(
    ("field", "setting"),
    [
        ("ulysses_size", "ULYSSES_SIZE"),
        ("cfg_size", "CFG_SIZE"),
        ("dit_fsdp", "DIT_FSDP"),
        ("t5_fsdp", "T5_FSDP"),
        ("vae_parallel", "VAE_PARALLEL"),
        ("t5_cpu", "T5_CPU"),
    ],
)
def test_node_layout_fields_are_refused_naming_the_node_setting(field: str, setting: str) -> None:
    """A seed-era layout knob in a job is an error that says which node setting to change."""
    message = _refusal(_minimal(**{field: 2}))
    assert repr(field) in message
    assert setting in message
    assert "node" in message


def test_presets_resolve_to_their_published_values() -> None:
    """fast, balanced and high give the documented steps, guidance and solver."""
    expected = {
        QualityPreset.FAST: (20, 2.5, SampleSolver.UNIPC),
        QualityPreset.BALANCED: (30, 3.0, SampleSolver.UNIPC),
        QualityPreset.HIGH: (50, 4.0, SampleSolver.DPMPP),
    }
    for preset, (steps, cfg, solver) in expected.items():
        sampling = JobRequest.model_validate(_minimal(quality_preset=preset)).sampling()
        assert (sampling.infer_steps, sampling.guidance_scale, sampling.sample_solver) == (
            steps,
            cfg,
            solver,
        )
        assert sampling.sample_shift == 5.0


def test_explicit_fields_override_the_preset() -> None:
    """An explicit infer_steps wins over the preset's; the rest still come from it."""
    sampling = JobRequest.model_validate(_minimal(quality_preset="high", infer_steps=12)).sampling()
    assert (sampling.infer_steps, sampling.guidance_scale) == (12, 4.0)


def test_custom_preset_needs_steps_and_guidance() -> None:
    """quality_preset custom without infer_steps and guidance_scale is refused, naming both."""
    message = _refusal(_minimal(quality_preset="custom"))
    assert "infer_steps and guidance_scale" in message


def test_inline_images_are_capped() -> None:
    """A base64 image over the cap is refused with advice to send a reference instead."""
    big = base64.b64encode(b"\0" * (MAX_BASE64_IMAGE_BYTES + 1)).decode()
    message = _refusal(_minimal(image={"base64": big}))
    assert "1024 KiB" in message
    assert "url or s3" in message
    at_cap = base64.b64encode(b"\0" * MAX_BASE64_IMAGE_BYTES).decode()
    assert JobRequest.model_validate(_minimal(image={"base64": at_cap}))


def test_data_url_prefix_is_accepted() -> None:
    """A browser-style data: URL is accepted and stored as plain base64."""
    request = JobRequest.model_validate(_minimal(image={"base64": "data:image/png;base64,aGk="}))
    assert request.image.model_dump() == {"base64": "aGk="}


def test_requests_are_immutable() -> None:
    """A request cannot be changed after validation (it is shared across tasks)."""
    request = JobRequest.model_validate(_minimal())
    with pytest.raises(ValidationError):
        request.prompt = "changed"  # type: ignore[misc]


def test_unsized_and_untrained_sizes_are_flagged() -> None:
    """1024*576 and 1920*1080 are accepted but marked as outside the training sizes."""
    assert not ImageSize.FULL_HD_1080P.trained
    assert not ImageSize.PREVIEW_576P.trained
    assert ImageSize.LANDSCAPE_720P.trained
    assert (ImageSize.PORTRAIT_480P.width, ImageSize.PORTRAIT_480P.height) == (480, 832)
