"""The engine on one GPU against the CPU: same frames within bf16 tolerance, seconds per step.

For the tiny model and a mid-size DiT (12 layers, 12 heads x 128, ~0.6 B parameters, the
tiny model's other parts), generates the same job on the CPU in fp32 (the reference), on
the GPU in fp32 and in bf16, and prints per run: seconds per denoising step (second of
two runs), decode seconds, peak device memory, and the difference of its frames from the
CPU's (max and mean over uint8 levels, PSNR). PASS/FAIL lines apply the tolerances below.

    python benchmarks/engine_gpu.py --out benchmarks/results/engine_gpu_h100.txt
    python benchmarks/engine_gpu.py --device cpu --models tiny   # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from i2v_fleet.pipeline import Generated, GenerationRequest, WanI2V, write_tiny_model

MID = {
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "ffn_dim": 8960,
    "num_layers": 12,
    "freq_dim": 256,
    "added_kv_proj_dim": 12 * 128,
}
# fp32 on the GPU differs from the CPU by kernel rounding only; bf16 keeps 8 mantissa bits.
TOLERANCE = {"float32": {"mean": 0.5, "psnr": 40.0}, "bfloat16": {"mean": 6.0, "psnr": 25.0}}


def _request(width: int, height: int, frames: int, steps: int) -> GenerationRequest:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    return GenerationRequest(
        image=Image.fromarray(pixels, "RGB"),
        prompt="a red fox runs through fresh snow in a quiet forest at sunrise",
        width=width,
        height=height,
        num_frames=frames,
        infer_steps=steps,
        guidance_scale=5.0,
        seed=42,
    )


def _run(
    model: Path, device: str, dtype: torch.dtype, request: GenerationRequest
) -> dict[str, Any]:
    engine = WanI2V.load(model, device=device, dtype=dtype)
    if device != "cpu":
        getattr(torch, device).reset_peak_memory_stats()
    outcome: Any = None
    for _ in range(2 if device != "cpu" else 1):  # the first GPU run warms up the kernels
        t0 = time.perf_counter()
        outcome = engine.generate(request)
        total = time.perf_counter() - t0
    assert isinstance(outcome, Generated)
    peak = getattr(torch, device).max_memory_allocated() / 2**30 if device != "cpu" else 0.0
    del engine
    return {
        "frames": outcome.frames,
        "step_s": outcome.timings["denoising"] / request.infer_steps,
        "decode_s": outcome.timings["decoding"],
        "total_s": total,
        "peak_gib": peak,
    }


def _compare(frames: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    diff = np.abs(frames.astype(np.float64) - reference.astype(np.float64))
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return {"max": float(diff.max()), "mean": float(diff.mean()), "psnr": psnr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    request = _request(width, height, args.frames, args.steps)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor()
    lines = [
        f"engine on {args.device} ({name}) vs CPU fp32; torch {torch.__version__}; "
        f"{width}x{height}, {args.frames} frames, {args.steps} steps, guidance 5.0",
        "",
    ]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models.split(","):
            model = write_tiny_model(Path(tmp) / which, transformer=MID if which == "mid" else None)
            reference = _run(model, "cpu", torch.float32, request)
            lines.append(
                f"[{which}] cpu fp32: {reference['step_s']:.3f} s/step, "
                f"decode {reference['decode_s']:.2f} s"
            )
            for dtype in (torch.float32, torch.bfloat16):
                r = _run(model, args.device, dtype, request)
                d = _compare(r["frames"], reference["frames"])
                limit = TOLERANCE[str(dtype).removeprefix("torch.")]
                ok = d["mean"] <= limit["mean"] and d["psnr"] >= limit["psnr"]
                failed |= not ok
                lines.append(
                    f"[{which}] {args.device} {dtype}: {r['step_s']:.4f} s/step, "
                    f"decode {r['decode_s']:.2f} s, "
                    f"peak {r['peak_gib']:.2f} GiB; vs cpu max {d['max']:.0f} mean {d['mean']:.3f} "
                    f"PSNR {d['psnr']:.1f} dB -> {'PASS' if ok else 'FAIL'} "
                    f"(mean <= {limit['mean']}, PSNR >= {limit['psnr']})"
                )
                print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
