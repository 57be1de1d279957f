"""The sampling loop: equal to diffusers' pipeline, reproducible, and stoppable per step."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_fleet.pipeline import (
    Generated,
    GenerationRequest,
    InvalidRequest,
    Stopped,
    WanI2V,
    make_scheduler,
)


def _request(image: Image.Image, **overrides: object) -> GenerationRequest:
    base = GenerationRequest(
        image=image,
        prompt="a cat walks along a sunlit windowsill",
        negative_prompt="blurry, low quality",
        width=96,
        height=64,
        num_frames=5,
        infer_steps=4,
        guidance_scale=3.0,
        seed=7,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def _frames(outcome: object) -> np.ndarray:
    assert isinstance(outcome, Generated)
    return outcome.frames


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_frames_match_diffusers_wan_pipeline(
    engine: WanI2V, tiny_model_dir: Path, small_image: Image.Image, solver: str
) -> None:
    """Our loop gives diffusers' WanImageToVideoPipeline frames for the same inputs and seed.

    Measured: max |difference| 1.3e-6 on [0, 1] floats; after rounding to uint8 a pixel
    may land one level apart where a value sits on .5, so the test allows one level.
    """
    from diffusers import WanImageToVideoPipeline

    request = _request(small_image, solver=solver, shift=5.0)
    ours = _frames(engine.generate(request))

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.scheduler = make_scheduler(dict(pipe.scheduler.config), solver, 5.0)  # type: ignore[arg-type]
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        image=small_image,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=64,
        width=96,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames[0]
    reference_u8 = np.round(reference * 255).astype(np.uint8)

    assert ours.shape == reference_u8.shape == (5, 64, 96, 3)
    diff = np.abs(ours.astype(int) - reference_u8.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.001
    assert ours.std() > 1  # not a blank video: the comparison means something


def test_same_seed_same_frames_and_seeds_matter(engine: WanI2V, small_image: Image.Image) -> None:
    """A seed reproduces its video exactly; another seed gives another video."""
    first = _frames(engine.generate(_request(small_image, seed=11)))
    again = _frames(engine.generate(_request(small_image, seed=11)))
    other = _frames(engine.generate(_request(small_image, seed=12)))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1


def test_an_unseeded_run_reports_the_seed_it_used(engine: WanI2V, small_image: Image.Image) -> None:
    """Without a seed the engine picks one, reports it, and that seed reproduces the video."""
    outcome = engine.generate(_request(small_image, seed=None))
    assert isinstance(outcome, Generated)
    replay = _frames(engine.generate(_request(small_image, seed=outcome.seed)))
    np.testing.assert_array_equal(outcome.frames, replay)


def test_progress_reports_every_step_and_phase_in_order(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """on_progress sees each phase start and end, and every denoising step, in order."""
    events: list[tuple[str, int, int]] = []
    engine.generate(_request(small_image), on_progress=lambda p, s, t: events.append((p, s, t)))
    phases = [p for p, _, _ in events]
    assert phases.index("encoding_prompt") < phases.index("denoising") < phases.index("decoding")
    steps = [(s, t) for p, s, t in events if p == "denoising"]
    assert steps == [(i, 4) for i in range(5)]
    assert events[-1] == ("decoding", 1, 1)


def test_a_stop_ends_at_the_next_step_without_decoding(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """should_stop() turning true stops before the next step and skips the VAE decode."""
    events: list[str] = []
    done = {"steps": 0}

    def on_progress(phase: str, step: int, total: int) -> None:
        events.append(phase)
        if phase == "denoising":
            done["steps"] = step

    outcome = engine.generate(
        _request(small_image), on_progress=on_progress, should_stop=lambda: done["steps"] >= 2
    )
    assert isinstance(outcome, Stopped)
    assert (outcome.step, outcome.total_steps, outcome.seed) == (2, 4, 7)
    assert "decoding" not in events


def test_the_engine_serves_the_next_job_normally_after_a_stop(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """A stopped job leaves nothing behind: the next run equals a run on a fresh engine."""
    baseline = _frames(engine.generate(_request(small_image)))
    stopped = engine.generate(_request(small_image), should_stop=lambda: True)
    assert isinstance(stopped, Stopped)
    assert stopped.step == 0
    np.testing.assert_array_equal(_frames(engine.generate(_request(small_image))), baseline)


def test_no_guidance_runs_one_branch(engine: WanI2V, small_image: Image.Image) -> None:
    """guidance_scale 1.0 skips the unconditional pass: one transformer call per step."""
    calls = {"n": 0}
    handle = engine.c.transformer.register_forward_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)
    )
    try:
        engine.generate(_request(small_image, guidance_scale=1.0, infer_steps=3))
        single = calls["n"]
        calls["n"] = 0
        engine.generate(_request(small_image, guidance_scale=3.0, infer_steps=3))
    finally:
        handle.remove()
    assert (single, calls["n"]) == (3, 6)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"width": 100}, "multiples of 16"),
        ({"num_frames": 6}, "4n+1"),
        ({"infer_steps": 0}, "infer_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"solver": "heun"}, "unipc, dpm++, euler"),
        ({"prompt": "  "}, "prompt"),
    ],
)
def test_bad_parameters_are_refused_before_any_work(
    engine: WanI2V, small_image: Image.Image, overrides: dict[str, object], words: str
) -> None:
    """Each impossible parameter gets an invalid_request error that names it."""
    with pytest.raises(InvalidRequest, match=re.escape(words)) as info:
        engine.generate(_request(small_image, **overrides))
    assert info.value.code == "invalid_request"


def test_an_unprepared_image_is_refused(engine: WanI2V) -> None:
    """The image must already be RGB at the target size: the engine never guesses a crop."""
    with pytest.raises(InvalidRequest, match="prepare_image"):
        engine.generate(_request(Image.new("RGBA", (96, 64))))


@pytest.mark.slow
def test_a_real_photo_becomes_a_decodable_mp4_through_the_public_api(
    engine: WanI2V, tmp_path: Path
) -> None:
    """prepare_image, generate and encode_mp4 turn a JPEG photo into an H.264 video."""
    from i2v_fleet.pipeline import encode_mp4, prepare_image, probe_mp4

    photo = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
    image = prepare_image(photo.read_bytes(), 480, 832)
    outcome = engine.generate(
        GenerationRequest(
            image=image,
            prompt="she smiles",
            width=480,
            height=832,
            num_frames=5,
            infer_steps=2,
            seed=0,
        )
    )
    info = encode_mp4(_frames(outcome), tmp_path / "v.mp4", fps=16)
    probed = probe_mp4(tmp_path / "v.mp4")
    assert (probed.width, probed.height, probed.num_frames, probed.codec) == (480, 832, 5, "h264")
    assert info.size_bytes == (tmp_path / "v.mp4").stat().st_size


def test_out_of_memory_becomes_a_retryable_typed_error(
    engine: WanI2V, small_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device OOM surfaces as OutOfMemory (code out_of_memory) with advice, not a crash."""
    from i2v_fleet.pipeline import OutOfMemory

    def boom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.c.transformer, "forward", boom)
    with pytest.raises(OutOfMemory, match="fewer frames") as info:
        engine.generate(_request(small_image))
    assert (info.value.code, info.value.retryable) == ("out_of_memory", True)


def test_the_negative_prompt_is_encoded_once_across_jobs(
    engine: WanI2V, small_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second job with the same negative prompt reuses its embeddings (the text encoder
    runs for the prompt alone), and its frames are those of an uncached run."""
    request = _request(small_image, infer_steps=2, negative_prompt="grainy, static")
    first = _frames(engine.generate(request))
    encoded: list[str] = []
    original = engine._run_text_encoder

    def counting(text: str, max_length: int) -> torch.Tensor:
        encoded.append(text)
        return original(text, max_length)

    monkeypatch.setattr(engine, "_run_text_encoder", counting)
    second = _frames(engine.generate(request))
    assert encoded == [request.prompt]
    assert np.array_equal(first, second)
    other = _frames(engine.generate(replace(request, negative_prompt="washed out")))
    assert encoded == [request.prompt, request.prompt, "washed out"]
    assert not np.array_equal(first, other)


def test_frames_reach_the_caller_in_order_as_they_are_decoded(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """`on_frames` gets the frames a latent frame at a time (so rank 0 can encode them
    while the rest decodes); together they are the outcome's frames."""
    chunks: list[np.ndarray] = []
    request = _request(small_image, infer_steps=1, num_frames=9)
    frames = _frames(engine.generate(request, on_frames=chunks.append))
    assert [len(c) for c in chunks] == [1, 4, 4]
    assert np.array_equal(np.concatenate(chunks), frames)
