"""TORCH_COMPILE: the transformer blocks compiled once at engine start, warmed at each size.

Owns compiling the repeated blocks, the warm-up forwards that do the compiling before any
job, and the checks that the result is what was asked for. Must never let a compiled
engine run eagerly or recompile per block without saying so: a graph break in a plain
block, or a recompile storm (`fail_on_recompile_limit_hit`), stops the engine at start.

Each block's `forward` is compiled (not `_call_impl`, as diffusers' `compile_repeated_blocks`
does), so module hooks stay outside the graph: FSDP2's all-gathers, the Ulysses split of
block 0's input and diffusers' first-block cache (whose hook replaces `forward` and wraps
the compiled one) run eagerly around it. All 40 blocks share one graph: they share one
code object, and `dynamic=True` keeps sizes symbolic, so a new resolution does not
recompile. The attention cache's processor runs outside the graph (its per-block Python
state would otherwise be guarded on, one recompile per block), which splits a block into
two graphs around self-attention; that variant is warmed too, and so is the plain pass
after it (dynamo may then route plain passes through the split variant).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CompileFailed

if TYPE_CHECKING:
    from .engine import WanI2V

log = logging.getLogger(__name__)

Size = tuple[int, int, int]
"""(width, height, num_frames)."""

DEFAULT_FRAMES = 81
DEFAULT_WARMUP_SIZES: tuple[Size, ...] = ((1280, 720, DEFAULT_FRAMES), (720, 1280, DEFAULT_FRAMES))
"""The trained 720p sizes at the default frame count."""


def parse_sizes(text: str) -> tuple[Size, ...]:
    """`"1280*720,720*1280"` or with frames, `"1280*720*81"`; frames default to 81."""
    sizes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = [int(p) for p in item.lower().replace("x", "*").split("*")]
        if len(parts) == 2:
            parts.append(DEFAULT_FRAMES)
        if len(parts) != 3 or min(parts) < 1:
            raise ValueError(f"{item!r} is not WIDTH*HEIGHT or WIDTH*HEIGHT*FRAMES")
        sizes.append((parts[0], parts[1], parts[2]))
    return tuple(sizes)


@dataclass(frozen=True)
class CompileReport:
    """What compiling cost at start and what it made."""

    warmup_s: float
    graphs: int
    sizes: tuple[Size, ...]


def _counters() -> Any:
    from torch._dynamo.utils import counters

    return counters


def graph_count() -> int:
    """Graphs dynamo compiled in this process so far (a recompile adds one)."""
    return int(_counters()["stats"]["unique_graphs"])


def _graph_breaks() -> dict[str, int]:
    return dict(_counters()["graph_break"])


def compile_blocks(transformer: Any) -> None:
    """Compile every block's forward (in place). Process-wide: recompile-limit hits raise
    instead of running eagerly; acceptable in an engine rank, a process of its own."""
    import torch

    with warnings.catch_warnings():  # torch's own import-time deprecations (torch.jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._dynamo.config as dynamo_config
        import torch._inductor.compile_fx  # imported now, not in the middle of the warm-up

    dynamo_config.fail_on_recompile_limit_hit = True
    for block in transformer.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    transformer._i2v_compiled = True


def is_compiled(transformer: Any) -> bool:
    return bool(getattr(transformer, "_i2v_compiled", False))


def warm_up(engine: WanI2V, sizes: tuple[Size, ...]) -> CompileReport:
    """One transformer forward at each size (every rank calls this, as it calls generate),
    then one with the attention cache and one without at the first size. Raises CompileFailed when a
    plain block did not compile to one graph."""
    from .caches import applied_cache
    from .request import AttentionCacheSpec

    t0 = time.perf_counter()
    graphs = graph_count()
    breaks = _graph_breaks()
    for size in sizes:
        _forward(engine, size)
    plain = {k: v - breaks.get(k, 0) for k, v in _graph_breaks().items() if v > breaks.get(k, 0)}
    if plain:
        raise CompileFailed(
            f"TORCH_COMPILE: the transformer blocks do not compile as one graph ({plain}); "
            "set TORCH_COMPILE=false"
        )
    if sizes:
        transformer = engine.c.transformer
        with applied_cache(transformer, AttentionCacheSpec(0, 2, 1), 2, engine.ranks) as cache:
            cache.at(0, "cond")
            _forward(engine, sizes[0])
        # Once the split variant exists a plain pass may take it, and then compiles the
        # attention module's own frame for the plain processor: do that now, not in a job.
        _forward(engine, sizes[0])
    report = CompileReport(time.perf_counter() - t0, graph_count() - graphs, sizes)
    log.info(
        "compiled the transformer blocks: %d graphs, warm-up %.1f s at %s",
        report.graphs,
        report.warmup_s,
        ", ".join(f"{w}*{h}*{f}" for w, h, f in sizes),
    )
    return report


def tokens(engine: WanI2V, size: Size) -> int:
    """The transformer's sequence length for a video of `size`."""
    width, height, frames = size
    patch = engine.c.transformer.config.patch_size
    latent_frames = (frames - 1) // engine.temporal_factor + 1
    h, w = height // engine.spatial_factor, width // engine.spatial_factor
    return int(latent_frames // patch[0] * (h // patch[1]) * (w // patch[2]))


def _forward(engine: WanI2V, size: Size) -> None:
    """One transformer pass on random inputs shaped as `generate` shapes them."""
    import torch

    from .engine import make_scheduler

    c = engine.c
    transformer = c.transformer
    width, height, frames = size
    latent_frames = (frames - 1) // engine.temporal_factor + 1
    shape = (
        1,
        transformer.config.in_channels,
        latent_frames,
        height // engine.spatial_factor,
        width // engine.spatial_factor,
    )
    scheduler = make_scheduler(c.scheduler_config, "unipc", 5.0)
    scheduler.set_timesteps(2, device=c.device)
    timestep = scheduler.timesteps[0].expand(1)
    vision = c.image_encoder.config
    image_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    gen = torch.Generator().manual_seed(0)

    def noise(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen).to(c.device, c.dtype)

    text = noise(1, 512, transformer.config.text_dim)
    image = noise(1, image_tokens, vision.hidden_size)
    mode = torch.no_grad() if engine.ranks.distributed else torch.inference_mode()
    with mode, transformer.cache_context("cond"):
        transformer(
            hidden_states=noise(*shape),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )
