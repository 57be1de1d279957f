"""Run a function on N gloo ranks in spawned processes, the way the engine's ranks run.

`run_ranks(fn, world_size, *args)` returns each rank's return value (rank order) or raises
with the failing rank's traceback. `fn(rank, world_size, *args)` must be importable at
module level (spawn pickles it by name); its return value must be picklable.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from i2v_fleet.producer_sdk.devstack import free_port

# Every rank is forked from one server process that imported these once, instead of each
# spawned rank importing torch, diffusers and transformers again (about 10 s of a 2-core
# machine per rank). The server is a clean process, as spawn gives: nothing of pytest's.
PRELOAD = [
    "torch",
    "torch.distributed",
    "diffusers",
    "transformers",
    "i2v_fleet.pipeline.engine",
    "i2v_fleet.pipeline.loading",
    "i2v_fleet.pipeline.parallel",
    "tests.pipeline.ranks",
]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240
) -> list[Any]:
    ctx = _context()
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(out))
                dead = [r for r in missing if not procs[r].is_alive()]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(
                        f"ranks {missing} gave no result (exited: {dead})"
                    ) from None
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, results: Any, args: tuple
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
