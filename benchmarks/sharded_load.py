"""Peak memory of loading a transformer unsharded vs FSDP2-sharded, per rank, on this CPU.

Writes a mid-size WanTransformer3DModel (8 layers, 8 heads of 64, ffn 2048, the tiny
model's other dims; fp32 safetensors in several files with an index, as the 14B is) to a
temporary folder, then loads it three ways, each in fresh spawned processes: unsharded as
pipeline/loading.py does (`from_pretrained(...).to(device)`), and with
pipeline.sharding.load_sharded on 1 and on 4 gloo ranks. For each rank it prints its RSS
just before the load (imports and process group done), the peak RSS during the load
(VmHWM, lowered to the current RSS first through /proc/self/clear_refs), what the load
added, the parameter bytes the rank holds, and the rank's lifetime ru_maxrss (which
includes the imports' peak and cannot be lowered).

    .venv/bin/python benchmarks/sharded_load.py [--dtype bfloat16] [--world 4]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import queue
import resource
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from i2v_fleet.connection import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MID_SIZE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 8,
    "attention_head_dim": 64,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 2048,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": 16,
    "added_kv_proj_dim": 512,
    "rope_max_seq_len": 1024,
}


def write_mid_size(out: Path) -> int:
    """Save the mid-size transformer to `out`; return its parameter count."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**MID_SIZE)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="50MB")
    return sum(p.numel() for p in model.parameters())


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Lower the peak RSS (VmHWM) to the current RSS, so the peak is the load's, not the
    imports' (importing diffusers and transformers peaks above a small load). Freed heap
    goes back to the system first: kept resident, it would hide what the load allocates.

    ru_maxrss cannot be lowered: the kernel folds the peak into it for good whenever a
    thread exits, so it is reported for the rank's whole life."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_in_rank(
    rank: int, world: int, folder: str, dtype_name: str, sharded: bool
) -> dict[str, Any]:
    """Load the transformer in this rank; report its peak RSS and parameter bytes."""
    from diffusers import WanTransformer3DModel

    from i2v_fleet.pipeline.sharding import load_sharded, local_param_bytes, transformer_units

    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    _reset_peak()
    before = _status_mib("VmRSS")
    if sharded:
        model = load_sharded(
            WanTransformer3DModel, folder, dtype=dtype, device=cpu, units=transformer_units
        )
    else:  # as pipeline/loading.py's _weights
        loaded = WanTransformer3DModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        model = loaded.to(cpu)
    return {
        "before": before,
        "peak": _status_mib("VmHWM"),
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "params": local_param_bytes(model),
    }


def run(world: int, *args: Any) -> list[dict[str, Any]]:
    """`load_in_rank` on `world` spawned gloo ranks; each rank's result, in rank order."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world, port, results, args)) for rank in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world:
            try:
                rank, value = results.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit("a rank died; see its traceback above") from None
                continue
            out[rank] = value
    finally:
        for p in procs:
            p.join(30)
    return [out[r] for r in range(world)]


def _entry(rank: int, world: int, port: int, results: Any, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # Imported before the baseline, as a worker has them: the load's figures are its own.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401

    import i2v_fleet.pipeline.sharding  # noqa: F401

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        results.put((rank, load_in_rank(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--world", type=int, default=4)
    a = parser.parse_args()
    # glibc otherwise keeps freed blocks of a few MiB resident (its mmap threshold grows
    # with each such free): gathering each unit once would then look like a full copy.
    # A fixed threshold returns them on free, so RSS follows the live tensors. The ranks
    # inherit it; it applies to all three loads alike.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        count = write_mid_size(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"mid-size WanTransformer3DModel: {count / 1e6:.1f}M parameters, "
            f"{size / 2**20:.0f} MiB of fp32 safetensors in "
            f"{len(list(folder.glob('*.safetensors')))} files; loaded as {a.dtype}"
        )
        print(
            f"{'load':<16}{'rank':>5}{'RSS before':>12}{'peak':>8}{'added':>8}"
            f"{'params':>8}{'ru_maxrss':>11}   (MiB)"
        )
        for label, world, sharded in [
            ("unsharded", 1, False),
            ("sharded ws=1", 1, True),
            (f"sharded ws={a.world}", a.world, True),
        ]:
            for rank, r in enumerate(run(world, str(folder), a.dtype, sharded)):
                print(
                    f"{label:<16}{rank:>5}{r['before']:>12.0f}{r['peak']:>8.0f}"
                    f"{r['peak'] - r['before']:>8.0f}{r['params'] / 2**20:>8.1f}"
                    f"{r['maxrss']:>11.0f}"
                )


if __name__ == "__main__":
    main()
