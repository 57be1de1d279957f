"""The ranks of one engine: process groups, lockstep agreement, Ulysses and CFG parallel.

Owns how `cfg_size x ulysses_size` ranks split one generation (DESIGN section 7): rank r
runs guidance branch `r // ulysses_size` (0 = conditional, 1 = unconditional) on sequence
shard `r % ulysses_size`; the self-attention of every block trades sequence shards for
head shards with an all-to-all, so each rank attends over the whole sequence for its
heads. Every rank ends each step with identical latents. Must never let ranks disagree on
what to do next: stop and error decisions go through `agree`, one tiny collective on a
CPU (gloo) group that is separate from the data group.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .layout import ParallelLayout

log = logging.getLogger(__name__)

CONTINUE, STOP, ERROR = 0, 1, 2
"""What a rank wants after a step; the ranks do the largest value any of them wants."""


class RanksOutOfStep(RuntimeError):
    """This rank failed and the others did not join the agreement in time (they wait in a
    data collective this rank will never enter): the engine must exit and be restarted."""

    failure: tuple[str, str, bool] | None = None
    """(code, message, retryable) of the error this rank hit, for the supervisor."""


def backend_for(device_kind: str) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device_kind, "gloo")


@dataclass
class Ranks:
    """This process's place among the engine's ranks and the groups it talks through."""

    rank: int = 0
    world_size: int = 1
    ulysses_size: int = 1
    cfg_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any = None
    """gloo group over all ranks for decisions and small objects (CPU tensors)."""
    ulysses_group: Any = None
    """The ranks that share this rank's guidance branch (sequence/head shards)."""
    cfg_group: Any = None
    """This rank and its peer on the other branch (the same sequence shard)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def branch(self) -> int:
        """0: this rank computes the conditional branch; 1: the unconditional one."""
        return self.rank // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses_size

    @classmethod
    def start(
        cls,
        layout: ParallelLayout,
        rank: int,
        device: torch.device,
        init_method: str,
        timeout_s: float,
    ) -> Ranks:
        """Join the engine's process group and build its subgroups (every rank calls this)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend_for(device.type),
            init_method=init_method,
            rank=rank,
            world_size=layout.nproc,
            timeout=timeout,
            device_id=device if device.type != "cpu" else None,
        )
        return cls.within(layout, device, timeout_s)

    @classmethod
    def within(cls, layout: ParallelLayout, device: torch.device, timeout_s: float) -> Ranks:
        """The groups of `layout` inside the already initialised default process group."""
        timeout = datetime.timedelta(seconds=timeout_s)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != layout.nproc:
            raise ValueError(f"the process group has {world} ranks, the layout {layout.nproc}")
        # Every rank creates every group, in the same order, as torch requires.
        control = dist.new_group(backend="gloo", timeout=timeout)
        u, c = layout.ulysses_size, layout.cfg_size
        ulysses_group = cfg_group = None
        for b in range(c):
            g = dist.new_group(list(range(b * u, (b + 1) * u)), timeout=timeout)
            if rank // u == b:
                ulysses_group = g
        for s in range(u):
            g = dist.new_group([s + b * u for b in range(c)], timeout=timeout)
            if rank % u == s:
                cfg_group = g
        return cls(rank, world, u, c, device, control, ulysses_group, cfg_group)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # -- decisions and small objects (control group) ---------------------------------

    def agree(self, status: int, timeout_s: float | None = None) -> int:
        """The largest status any rank wants (CONTINUE < STOP < ERROR). With `timeout_s`,
        raise RanksOutOfStep when the others do not arrive in time."""
        if not self.distributed:
            return status
        value = torch.tensor([status], dtype=torch.int64)
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control, async_op=True)
        if timeout_s is None:
            work.wait()
        else:
            try:
                work.wait(timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as exc:
                raise RanksOutOfStep(
                    f"rank {self.rank}: the other ranks did not reach the step's agreement "
                    f"within {timeout_s:.0f} s"
                ) from exc
        return int(value.item())

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (control group; pickled)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (control group)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    # -- tensors (data group) ---------------------------------------------------------

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s tensor on every rank (same shape and dtype on all of them)."""
        if self.distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def exchange_branches(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG parallel: (conditional, unconditional) predictions on every rank, from this
        rank's branch and its peer's."""
        parts = [torch.empty_like(noise) for _ in range(self.cfg_size)]
        dist.all_gather(parts, noise.contiguous(), group=self.cfg_group)
        return parts[0], parts[1]


# -- Ulysses sequence parallelism -------------------------------------------------------


@dataclass
class _Sequence:
    """The current forward pass's sequence length and the padding that makes it divide."""

    shards: int
    index: int
    length: int = 0
    pad: int = 0

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of `x` along `dim`, zero-padded so every shard is equal."""
        if self.pad:
            shape = list(x.shape)
            shape[dim] = self.pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.shards, dim=dim)[self.index].contiguous()


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; the result's chunk i came from rank i."""
    x = x.contiguous()  # before empty_like, which would copy a permuted layout
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, p: int, group: Any) -> torch.Tensor:
    """(B, S/p, H, D) sequence shard -> (B, S, H/p, D) head shard."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4)  # (p, B, s, H/p, D)
    x = _all_to_all(x, group)  # chunk i: sequence shard i, our heads
    return x.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def _heads_to_sequence(x: torch.Tensor, p: int, group: Any) -> torch.Tensor:
    """(B, S, H/p, D) head shard -> (B, S/p, H, D) sequence shard."""
    b, full, hp, d = x.shape
    x = x.reshape(b, p, full // p, hp, d).permute(1, 0, 2, 3, 4)  # (p, B, s, H/p, D)
    x = _all_to_all(x, group)  # chunk i: our sequence shard, head group i
    return x.permute(1, 2, 0, 3, 4).reshape(b, full // p, p * hp, d)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding (as diffusers' WanAttnProcessor applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesSelfAttention:
    """Self-attention over the whole sequence from a sequence shard: project locally,
    all-to-all to head shards, attend, all-to-all back. Same math as WanAttnProcessor.

    The padding that makes the sequence divide sits at its end, so the keys and values
    are cut to the real length instead of masked: exact, and it lets mask-less kernels
    (flash, cuDNN, sage, ...) run. The extra query rows are dropped by `gather_tokens`.
    `ModelMixin.set_attention_backend` sets `_attention_backend` on every processor that
    has the attribute; None means diffusers' process-wide active backend."""

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, sequence: _Sequence, group: Any) -> None:
        self.sequence = sequence
        self.group = group

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        p = self.sequence.shards
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # type: ignore[arg-type]
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        query, key, value = (_sequence_to_heads(t, p, self.group) for t in (query, key, value))
        length = self.sequence.length
        if self.sequence.pad:
            key, value = key[:, :length], value[:, :length]
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
        )
        out = _heads_to_sequence(out.type_as(query), p, self.group)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]


def enable_ulysses(transformer: Any, ranks: Ranks) -> None:
    """Shard the transformer's token sequence over this rank's Ulysses group, for good:
    the rotary table and the first block's input are split, the self-attention of every
    block exchanges shards, and the output projection gathers the whole sequence."""
    p, group = ranks.ulysses_size, ranks.ulysses_group
    if p == 1:
        return
    sequence = _Sequence(shards=p, index=ranks.ulysses_rank)

    def split_rotary(module: Any, args: Any, output: tuple[torch.Tensor, ...]) -> Any:
        cos, sin = output
        sequence.length = cos.shape[1]
        sequence.pad = -sequence.length % p
        return sequence.split(cos), sequence.split(sin)

    def split_tokens(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (sequence.split(args[0]), *args[1:])

    def gather_tokens(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(output) for _ in range(p)]
        dist.all_gather(parts, output.contiguous(), group=group)
        return torch.cat(parts, dim=1)[:, : sequence.length]

    transformer.rope.register_forward_hook(split_rotary)
    transformer.blocks[0].register_forward_pre_hook(split_tokens)
    transformer.proj_out.register_forward_hook(gather_tokens)
    for block in transformer.blocks:
        block.attn1.set_processor(UlyssesSelfAttention(sequence, group))
    transformer._i2v_sequence = sequence  # read by the first-block cache's decision


def agree_first_block_cache(transformer: Any, ranks: Ranks) -> None:
    """Make diffusers' first-block cache decide alike on every rank: its residual change is
    measured over the whole sequence (sums across the Ulysses group, padding excluded), and
    the blocks run when any rank's branch needs them (sharded weights need every rank to
    run the same blocks). The patch goes with the hook when the cache is disabled."""
    if not ranks.distributed:
        return
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    hook = transformer.blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
    sequence: _Sequence | None = getattr(transformer, "_i2v_sequence", None)
    threshold = hook.threshold

    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            decision = torch.ones(1, dtype=torch.int32, device=residual.device)
        else:
            if sequence is not None and sequence.pad and sequence.index == sequence.shards - 1:
                keep = residual.shape[1] - sequence.pad
                residual, previous = residual[:, :keep], previous[:, :keep]
            sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
            if ranks.ulysses_size > 1:
                dist.all_reduce(sums, group=ranks.ulysses_group)
            decision = (sums[0] / sums[1] > threshold).to(torch.int32).view(1)
        dist.all_reduce(decision, op=dist.ReduceOp.MAX)
        return bool(decision.item())

    hook._should_compute_remaining_blocks = should_compute
