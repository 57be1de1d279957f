"""The engine on the CPU with the tiny model: seconds per phase, and what each cache saves.

Run: `.venv/bin/python benchmarks/engine_cpu.py [--out benchmarks/results/engine_cpu.txt]`.
Everything runs in one process, one configuration after another on the same loaded model,
so the ratios against the uncached run hold even though absolute CPU times vary by machine.
The tiny model's weights are random: the first-block cache's skip rate here says nothing
about its rate on the real model, whose residuals change smoothly between steps.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from i2v_fleet.pipeline import (
    AttentionCacheSpec,
    FirstBlockCacheSpec,
    Generated,
    GenerationRequest,
    Stopped,
    WanI2V,
    attention_reuse_schedule,
    encode_mp4,
    prepare_image,
    write_tiny_model,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "images" / "grace_hopper.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (min kept)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (fast preset: 20)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument(
        "--only-compile", action="store_true", help="run only the eager-vs-compiled section"
    )
    parser.add_argument(
        "--only-overlap", action="store_true", help="run only the decode/encode overlap section"
    )
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        engine = WanI2V.load(model, device="cpu")
        threads = torch.get_num_threads()
        say(f"# engine_cpu: tiny Wan2.1 I2V, torch {torch.__version__}, {threads} threads")
        if args.only_compile:
            compiled_vs_eager(engine, model, args.steps, args.repeats, say)
        elif args.only_overlap:
            decode_overlap(engine, Path(tmp), args.repeats, say)
        else:
            phases_and_caches(engine, args.steps, args.repeats, say)
            decode_overlap(engine, Path(tmp), args.repeats, say)
            compiled_vs_eager(engine, model, args.steps, args.repeats, say)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def phases_and_caches(engine: WanI2V, steps: int, repeats: int, say: Callable[..., None]) -> None:
    """Sections 1 and 2: every phase end to end, then denoising alone per cache kind."""
    # 1. End to end at the demo's size: every phase a worker runs, image bytes to MP4 bytes.
    data = EXAMPLE.read_bytes()
    say(f"\n## end to end: 832x480, 5 frames, {steps} steps, cfg 2.5 (min of {repeats})")
    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        image = prepare_image(data, 832, 480)
        phases = {"loading_inputs": time.perf_counter() - t0}
        outcome = engine.generate(
            GenerationRequest(
                image=image,
                prompt="she smiles and looks up",
                width=832,
                height=480,
                num_frames=5,
                infer_steps=steps,
                guidance_scale=2.5,
                seed=0,
            )
        )
        assert isinstance(outcome, Generated)
        phases.update(outcome.timings)
        t0 = time.perf_counter()
        encode_mp4(outcome.frames, io.BytesIO(), fps=16)
        phases["encoding_video"] = time.perf_counter() - t0
        phases["total"] = sum(phases.values())
        best = {k: min(v, best.get(k, v)) for k, v in phases.items()}
    for phase, seconds in best.items():
        say(f"{phase:<16} {seconds:7.2f} s  {100 * seconds / best['total']:5.1f} %")

    # 2. Denoising alone (decode skipped by stopping after the last step), per cache kind.
    size, frames = (1280, 720), 9
    say(f"\n## denoising only: {size[0]}x{size[1]}, {frames} frames, {steps} steps, cfg 2.5")
    image = prepare_image(data, *size)
    caches: list[tuple[str, object]] = [
        ("none", None),
        ("attention 12/4/37 (seed default)", AttentionCacheSpec(12, 4, 37)),
        ("attention 2/4/19", AttentionCacheSpec(2, 4, 19)),
        ("first_block 0.05", FirstBlockCacheSpec(0.05)),
        ("first_block 0.2", FirstBlockCacheSpec(0.2)),
    ]
    baseline = None
    say(f"{'cache':<34} {'seconds':>8} {'vs none':>8} {'reused':>7}")
    for name, spec in caches:
        times = []
        reused = 0  # first_block decides per step at run time; not counted here
        for _ in range(repeats):
            done = {"step": 0}
            outcome = engine.generate(
                GenerationRequest(
                    image=image,
                    prompt="she smiles",
                    width=size[0],
                    height=size[1],
                    num_frames=frames,
                    infer_steps=steps,
                    guidance_scale=2.5,
                    seed=0,
                    cache=spec,
                ),  # type: ignore[arg-type]
                on_progress=lambda p, s, t, d=done: d.update(step=s) if p == "denoising" else None,
                should_stop=lambda d=done: d["step"] >= steps,
            )
            assert isinstance(outcome, Stopped)
            times.append(outcome.timings["denoising"])
        seconds = min(times)
        baseline = baseline or seconds
        if isinstance(spec, AttentionCacheSpec):
            reused = sum(attention_reuse_schedule(spec, steps))
        say(f"{name:<34} {seconds:8.2f} {baseline / seconds:7.2f}x {reused:>7}")


def decode_overlap(engine: WanI2V, tmp: Path, repeats: int, say: Callable[..., None]) -> None:
    """Decode, then encode the MP4 (as before) against encoding in a thread while the
    decoder yields frames (as rank 0 does now): the same job, one step, many frames."""
    from i2v_fleet.pipeline.video import BackgroundMp4

    image = prepare_image(EXAMPLE.read_bytes(), 416, 240)
    request = GenerationRequest(
        image=image, prompt="she smiles", width=416, height=240, num_frames=33,
        infer_steps=1, guidance_scale=1.0, seed=1,
    )  # fmt: skip
    sequential, overlapped, decode, encode, tail = [], [], [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        outcome = engine.generate(request)
        assert isinstance(outcome, Generated)
        t1 = time.perf_counter()
        encode_mp4(outcome.frames, tmp / f"seq{i}.mp4", fps=16)
        t2 = time.perf_counter()
        sequential.append(t2 - t0)
        decode.append(outcome.timings["decoding"])
        encode.append(t2 - t1)

        mp4 = BackgroundMp4(tmp / f"ovl{i}.mp4", 16)
        t0 = time.perf_counter()
        outcome = engine.generate(request, on_frames=mp4.submit)
        t1 = time.perf_counter()
        mp4.finish()
        t2 = time.perf_counter()
        overlapped.append(t2 - t0)
        tail.append(t2 - t1)
    say()
    say("## Decode + MP4 encode: 416x240, 33 frames, 1 step, no guidance")
    say(f"decode           {min(decode):6.2f} s   (9 latent frames, 33 video frames)")
    say(f"encode after it  {min(encode):6.2f} s   (sequential: libx264 after the decode)")
    say(f"sequential job   {min(sequential):6.2f} s")
    say(f"overlapped job   {min(overlapped):6.2f} s   (encode tail after the decode "
        f"{min(tail):.2f} s)")  # fmt: skip
    say(f"ratio             {min(sequential) / min(overlapped):5.2f}x (sequential / overlapped)")


def compiled_vs_eager(
    engine: WanI2V, model: Path, steps: int, repeats: int, say: Callable[..., None]
) -> None:
    """Section 3: seconds per denoising step, eager and with TORCH_COMPILE, in this one
    process (the ratio is what to read; the absolute times are this machine's)."""
    size = (832, 480, 9)
    say(f"\n## TORCH_COMPILE: {size[0]}x{size[1]}, {size[2]} frames, {steps} steps, cfg 2.5")
    t0 = time.perf_counter()
    compiled = WanI2V.load(model, device="cpu", torch_compile=True, warmup_sizes=(size,))
    load_s = time.perf_counter() - t0
    assert compiled.compiled is not None
    image = prepare_image(EXAMPLE.read_bytes(), size[0], size[1])
    request = GenerationRequest(
        image=image,
        prompt="she smiles",
        width=size[0],
        height=size[1],
        num_frames=size[2],
        infer_steps=steps,
        guidance_scale=2.5,
        seed=0,
    )
    per_step: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        for name, which in (("eager", engine), ("compiled", compiled)):
            done = {"step": 0}
            outcome = which.generate(
                request,
                on_progress=lambda p, s, t, d=done: d.update(step=s) if p == "denoising" else None,
                should_stop=lambda d=done: d["step"] >= steps,
            )
            assert isinstance(outcome, Stopped)
            per_step[name].append(outcome.timings["denoising"] / steps)
    eager, fast = min(per_step["eager"]), min(per_step["compiled"])
    say(f"eager      {eager * 1e3:8.1f} ms/step")
    say(f"compiled   {fast * 1e3:8.1f} ms/step")
    say(f"ratio      {eager / fast:8.2f}x (eager / compiled)")
    say(
        f"compile    {compiled.compiled.warmup_s:8.1f} s warm-up ({compiled.compiled.graphs} "
        f"graphs), {load_s:.1f} s load in all"
    )


if __name__ == "__main__":
    main()
