"""Step caches: the attention cache (the Ascend port's semantics) and diffusers' hooks.

Owns the skip schedule and installing/removing a cache around one generation. Must never
let cache state outlive the job: everything is installed on entry and removed on exit,
so a cancelled job or a different step count cannot leak into the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .request import AttentionCacheSpec, CacheSpec, FirstBlockCacheSpec


def attention_reuse_schedule(spec: AttentionCacheSpec, steps: int) -> list[bool]:
    """For each 0-based step: True when blocks reuse their cached self-attention output.

    Reuse happens on steps in (start_step, end_step] that are not `interval` steps after
    a refresh; `start_step` itself and every interval boundary recompute. 12/4/37 over
    40 steps reuses 19 steps (13-15, 17-19, ..., 33-35, 37).
    """
    return [
        spec.start_step < i <= spec.end_step and (i - spec.start_step) % spec.interval != 0
        for i in range(steps)
    ]


@dataclass
class _AttentionCacheState:
    reuse: list[bool]
    step: int = 0
    branch: str = "cond"
    saved: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


class _CachedSelfAttention:
    """Wraps one block's self-attention processor: compute and remember, or replay.

    The attention backend lives on the inner processor: `set_attention_backend` reaches it
    through the `_attention_backend` property whether the wrapper is installed or not.
    On compiled blocks the wrapper runs outside the graph (`compiled_attention_cache`)."""

    def __init__(self, inner: Any, state: _AttentionCacheState, block: int) -> None:
        self.inner = inner
        self.state = state
        self.block = block

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.inner._attention_backend = backend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key = (self.state.branch, self.block)
        cached = self.state.saved.get(key)
        if self.state.reuse[self.state.step] and cached is not None:
            return cached
        out = self.inner(attn, hidden_states, *args, **kwargs)
        self.state.saved[key] = out
        return out

    # Never traced (TORCH_COMPILE): the step, branch and block read above would be guarded
    # on, one recompile per block; outside the graph they cost nothing.
    __call__ = torch.compiler.disable(__call__)


class CacheControl:
    """What the sampling loop tells the cache: which step and which CFG branch is running."""

    def __init__(self, state: _AttentionCacheState | None = None) -> None:
        self._state = state

    def at(self, step: int, branch: str) -> None:
        if self._state is not None:
            self._state.step = step
            self._state.branch = branch

    def reused_steps(self) -> int:
        return sum(self._state.reuse) if self._state is not None else 0


@contextmanager
def applied_cache(
    transformer: Any, spec: CacheSpec | None, steps: int, ranks: Any = None
) -> Iterator[CacheControl]:
    """Install `spec` on `transformer` for one generation of `steps` steps, then remove it.
    On several ranks (`ranks`: pipeline.parallel.Ranks) every rank takes the same skips."""
    if spec is None:
        yield CacheControl()
    elif isinstance(spec, AttentionCacheSpec):
        state = _AttentionCacheState(reuse=attention_reuse_schedule(spec, steps))
        originals = [block.attn1.processor for block in transformer.blocks]
        try:
            for i, block in enumerate(transformer.blocks):
                block.attn1.set_processor(_CachedSelfAttention(originals[i], state, i))
            yield CacheControl(state)
        finally:
            for block, original in zip(transformer.blocks, originals, strict=True):
                block.attn1.set_processor(original)
            state.saved.clear()
    elif isinstance(spec, FirstBlockCacheSpec):
        from diffusers.hooks import FirstBlockCacheConfig  # type: ignore[attr-defined]

        from .parallel import agree_first_block_cache

        _register_block_class(transformer)
        transformer.enable_cache(FirstBlockCacheConfig(threshold=spec.threshold))
        if ranks is not None:
            agree_first_block_cache(transformer, ranks)
        try:
            yield CacheControl()
        finally:
            transformer.disable_cache()
    else:  # pragma: no cover - the request's check() refuses other kinds
        raise TypeError(f"unknown cache spec {spec!r}")


def _register_block_class(transformer: Any) -> None:
    """Tell diffusers' hooks how the blocks of `transformer` return their outputs when
    their class is not the one diffusers registered: FSDP2 (DIT_FSDP) swaps each block's
    class for an `FSDP<Block>` subclass, which the first-block cache would refuse."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    block = type(transformer.blocks[0])
    try:
        TransformerBlockRegistry.get(block)
        return
    except ValueError:
        pass
    base = next(c for c in block.__mro__[1:] if _registered(c))
    known = TransformerBlockRegistry.get(base)
    # A new metadata object: `register` records the class on the one it is given.
    TransformerBlockRegistry.register(
        block,
        TransformerBlockMetadata(
            return_hidden_states_index=known.return_hidden_states_index,
            return_encoder_hidden_states_index=known.return_encoder_hidden_states_index,
            hidden_states_argument_name=known.hidden_states_argument_name,
            encoder_hidden_states_argument_name=known.encoder_hidden_states_argument_name,
        ),
    )


def _registered(cls: type) -> bool:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        TransformerBlockRegistry.get(cls)
    except ValueError:
        return False
    return True
