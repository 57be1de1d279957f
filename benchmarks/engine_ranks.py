"""Per-rank memory and speed of the engine's layouts on CPU with the tiny model.

Starts the real engine (consumer.engine.EngineHost: NPROC rank processes over gloo)
for each layout, runs the same job twice (the first warms up), and prints per rank: peak
RSS after loading, the transformer parameter bytes the rank holds, whether it holds the
text encoder; per layout: load time and seconds per denoising step, with the ratio to one
rank measured in the same process. On a 2-core machine several ranks share the cores, so
the step-time ratios measure overhead, not speed-up.

    python benchmarks/engine_ranks.py --out benchmarks/results/engine_ranks.txt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from i2v_fleet.consumer.engine import EngineConfig, EngineHost, JobDone, RunJob
from i2v_fleet.pipeline import GenerationRequest, write_tiny_model
from i2v_fleet.pipeline.layout import ParallelLayout

LAYOUTS: dict[str, dict[str, Any]] = {
    "1 rank": {},
    "4 ranks, Ulysses 4": {"nproc": 4, "ulysses_size": 4},
    "4 ranks, Ulysses 4, DIT_FSDP, T5_FSDP": {
        "nproc": 4,
        "ulysses_size": 4,
        "dit_fsdp": True,
        "t5_fsdp": True,
    },
    "4 ranks, CFG 2 x Ulysses 2, DIT_FSDP, T5_CPU, VAE_PARALLEL": {
        "nproc": 4,
        "ulysses_size": 2,
        "cfg_size": 2,
        "dit_fsdp": True,
        "t5_cpu": True,
        "vae_parallel": True,
    },
}


def _request(width: int, height: int, steps: int) -> GenerationRequest:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    return GenerationRequest(
        image=Image.fromarray(pixels, "RGB"),
        prompt="a lighthouse stands in a storm",
        width=width,
        height=height,
        num_frames=5,
        infer_steps=steps,
        guidance_scale=3.0,
        seed=5,
    )


async def _measure(config: EngineConfig, request: GenerationRequest, work: Path) -> dict[str, Any]:
    host = EngineHost(config, start_timeout_s=600, stall_timeout_s=600)
    t0 = time.perf_counter()
    await host.start()
    load_s = time.perf_counter() - t0

    async def ignore(_: Any) -> None:
        return None

    try:
        runs = []
        for i in range(2):
            out = work / f"run{i}"
            out.mkdir(parents=True, exist_ok=True)
            done = await host.run(RunJob(f"bench-{i}", request, str(out), 8), ignore)
            assert isinstance(done, JobDone)
            runs.append(done.timings)
        return {"load_s": load_s, "timings": runs[-1], "ranks": host.ranks}
    finally:
        await host.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="320x192", help="WIDTHxHEIGHT of the job")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    request = _request(width, height, args.steps)
    lines = [
        f"engine layouts on CPU, tiny model, {width}x{height}, 5 frames, {args.steps} steps, "
        f"guidance 3.0; {platform.node()}, {os.cpu_count()} cores",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        base = EngineConfig(model_dir=str(model), device="cpu", collective_timeout_s=600)
        baseline: float | None = None
        for name, fields in LAYOUTS.items():
            config = replace(base, layout=ParallelLayout(**fields))
            result = asyncio.run(_measure(config, request, Path(tmp) / "out"))
            step_s = result["timings"]["denoising"] / args.steps
            baseline = baseline or step_s
            lines.append(
                f"{name}: load {result['load_s']:.1f} s, {step_s:.3f} s/step "
                f"({step_s / baseline:.2f}x one rank), decode {result['timings']['decoding']:.2f} s"
            )
            for r in result["ranks"]:
                lines.append(
                    f"  rank {r.rank}: peak RSS {r.peak_rss_bytes / 2**20:7.1f} MiB, "
                    f"transformer params {r.transformer_param_bytes / 2**10:7.1f} KiB, "
                    f"text encoder {'yes' if r.text_encoder else 'no'}"
                )
            print("\n".join(lines[-1 - len(result["ranks"]) :]), flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
