"""Fault injection for the engine's tests: make one rank fail at a chosen transformer pass.

Owns the `EngineConfig.fault` spec and the hooks it installs. Must never act without a
spec: a node's config leaves `fault` empty and this module then does nothing.
"""

from __future__ import annotations

import os
from typing import Any


def install_fault(engine: Any, fault: str, rank: int) -> None:
    """`kind:rank:n` makes `rank` fail in its n-th transformer pass (from 0; one pass per
    guidance branch and step). `raise`: an exception inside the last block, while the
    other ranks go on into collectives; `raise_after`: an exception after the transformer,
    outside any collective; `exit`: the process dies inside the forward."""
    if not fault:
        return
    kind, fault_rank, fault_pass = fault.split(":")
    if int(fault_rank) != rank:
        return
    passes = {"n": -1}
    transformer = engine.c.transformer

    def count(*_: Any) -> None:
        passes["n"] += 1

    def fire(*_: Any) -> None:
        if passes["n"] == int(fault_pass):
            if kind == "exit":
                os._exit(3)  # a crash, not an exception: nothing of ours may run after it
            raise RuntimeError(f"injected fault on rank {rank}")

    # The rope runs once per transformer pass, before any block: a cheap pass counter.
    transformer.rope.register_forward_pre_hook(count)
    if kind == "raise_after":
        transformer.proj_out.register_forward_hook(fire)
    else:
        transformer.blocks[-1].register_forward_pre_hook(fire)
