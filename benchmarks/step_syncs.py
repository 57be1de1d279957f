"""Host synchronisations inside the denoising loop, counted per step on the CPU.

On a GPU or NPU every op that needs a device value on the host (`.item()`, `nonzero`,
`bool(tensor)`, `equal`, a copy to the CPU) stalls the launch queue until the device has
caught up, which keeps kernels from overlapping the Python that launches them. This runs
the tiny engine with the torch profiler on from the first denoising step to the decode,
and counts those ops. On the CPU the profiler cannot tell a device read from a host one:
UniPC and DPM++ keep their sigmas on the CPU on purpose and read them each step (no
device sync); the reads of device values are the timestep lookup's `nonzero` on the first
step and, with the first-block cache, diffusers' skip decision (one `.item()` per pass).

    .venv/bin/python benchmarks/step_syncs.py
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from i2v_fleet.pipeline import GenerationRequest, WanI2V, write_tiny_model
from i2v_fleet.pipeline.request import AttentionCacheSpec, FirstBlockCacheSpec

# Ops that read a device value on the host (as the profiler names them).
HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::nonzero",  # its output size depends on the values
    "aten::equal",
    "aten::masked_select",
}


class _DenoisingOnly:
    """Runs the torch profiler from the first denoising step to the end of the loop."""

    def __init__(self) -> None:
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.running = False

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase == "denoising" and not self.running and step == 0:
            self.prof.start()
            self.running = True
        elif phase != "denoising" and self.running:
            self.prof.stop()
            self.running = False

    def counts(self) -> collections.Counter[str]:
        if self.running:
            self.prof.stop()
            self.running = False
        return collections.Counter(e.name for e in self.prof.events() if e.name in HOST_READS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    model = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    engine = WanI2V.load(model, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3)).astype(np.uint8)
    cases: dict[str, dict[str, Any]] = {
        "unipc": {"solver": "unipc"},
        "dpm++": {"solver": "dpm++"},
        "unipc + attention cache": {"solver": "unipc", "cache": AttentionCacheSpec(1, 2, 5)},
        "unipc + first-block cache": {"solver": "unipc", "cache": FirstBlockCacheSpec(0.1)},
    }
    print(f"tiny model, 96x64, 5 frames, {args.steps} steps with guidance, CPU")
    print(f"{'case':<28} {'host reads':>10} {'per step':>9}  ops")
    for label, fields in cases.items():
        request = GenerationRequest(
            image=Image.fromarray(pixels),
            prompt="a cat",
            width=96,
            height=64,
            num_frames=5,
            infer_steps=args.steps,
            guidance_scale=3.0,
            seed=1,
            **fields,
        )
        window = _DenoisingOnly()
        engine.generate(request, on_progress=window)
        counts = window.counts()
        total = sum(counts.values())
        detail = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in counts.items())
        print(f"{label:<28} {total:>10} {total / args.steps:>9.2f}  {detail}")


if __name__ == "__main__":
    main()
