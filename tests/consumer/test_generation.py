"""Jobs become engine requests the same way in the worker and in `i2v generate`."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from i2v_fleet.consumer.generation import generation_request
from i2v_fleet.pipeline import AttentionCacheSpec, FirstBlockCacheSpec, probe_mp4
from i2v_fleet.producer_sdk.cli import app
from i2v_fleet.schemas import JobRequest

EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"


def _job(**fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {
            "job_id": str(uuid.uuid4()),
            "prompt": "p",
            "image": {"url": "https://a.io/x.png"},
            **fields,
        }
    )


def test_presets_and_overrides_reach_the_engine() -> None:
    """The high preset with an explicit step count maps to dpm++, cfg 4.0 and those steps."""
    image = Image.new("RGB", (832, 480))
    request = generation_request(
        _job(quality_preset="high", infer_steps=12, image_size="832*480", num_frames=9, seed=5),
        image,
    )
    assert (request.solver, request.guidance_scale, request.infer_steps) == ("dpm++", 4.0, 12)
    assert (request.width, request.height, request.num_frames, request.seed) == (832, 480, 9, 5)
    assert request.shift == 5.0


def test_job_cache_wins_over_the_node_default_and_none_disables_it() -> None:
    """A job's cache is used as given; absent takes the node's; kind none turns it off."""
    image = Image.new("RGB", (1280, 720))
    node = AttentionCacheSpec()
    assert generation_request(_job(), image, node_cache=node).cache == node
    assert generation_request(_job(cache={"kind": "none"}), image, node_cache=node).cache is None
    first = generation_request(_job(cache={"kind": "first_block", "threshold": 0.1}), image)
    assert first.cache == FirstBlockCacheSpec(0.1)
    seed_era = generation_request(_job(use_attentioncache=True, start_step=3), image)
    assert seed_era.cache == AttentionCacheSpec(3, 4, 37)


@pytest.mark.slow
def test_generate_turns_a_real_photo_into_a_decodable_mp4(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`i2v generate` makes an H.264 MP4 and a poster from a JPEG photo with the tiny model."""
    out = tmp_path / "video.mp4"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(EXAMPLE_IMAGE),
            "--prompt",
            "she smiles and looks up",
            "--model-dir",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--size",
            "480*832",
            "--frames",
            "5",
            "--steps",
            "3",
            "--seed",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    info = probe_mp4(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (480, 832, 5, 16)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    with Image.open(out.with_suffix(".jpg")) as poster:
        assert (poster.format, poster.size) == ("JPEG", (480, 832))


def test_generate_refuses_an_invalid_job_naming_the_field(tiny_model_dir: Path) -> None:
    """A bad option is reported like a worker reports an invalid job, and nothing runs."""
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(EXAMPLE_IMAGE),
            "-p",
            "x",
            "--model-dir",
            str(tiny_model_dir),
            "--frames",
            "80",
        ],
    )
    assert result.exit_code == 2
    assert "num_frames: must be 4n+1" in result.stderr


def test_turbo_reaches_the_engine_as_four_euler_steps_without_guidance() -> None:
    """A turbo job runs 4 euler steps at guidance 1.0 (the engine then skips the
    unconditional pass), shift 5."""
    request = generation_request(_job(quality_preset="turbo"), Image.new("RGB", (1280, 720)))
    assert (request.solver, request.infer_steps, request.guidance_scale) == ("euler", 4, 1.0)
    assert request.shift == 5.0
    assert not request.do_guidance
