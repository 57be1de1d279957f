"""How a node's cards share one job: ranks, Ulysses x CFG, sharding, and what each card holds.

Owns the layout arithmetic (DESIGN section 7) and its refusals, each saying what would
work instead, and the per-card weight memory of a layout. Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import PipelineError


class LayoutError(PipelineError, ValueError):
    """The node's layout settings cannot run this model; the message says what would.
    Raised at start, before any job: it is the node's configuration, not a job's."""


@dataclass(frozen=True)
class ParallelLayout:
    """One engine's layout: `nproc` ranks = `cfg_size` branches x `ulysses_size` ranks each."""

    nproc: int = 1
    ulysses_size: int = 1
    cfg_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    t5_cpu: bool = False
    vae_parallel: bool = False

    def as_fields(self) -> dict[str, int | bool]:
        """The layout as the node settings of the same names (NPROC, ULYSSES_SIZE, ... in
        lower case), in one place for every copy of it: the node's `schemas.Layout`, the
        env files of `i2v config` and the engine's config."""
        return asdict(self)

    def check(self, num_heads: int) -> None:
        """Refuse what cannot run, naming the settings that would (raises LayoutError)."""
        if self.nproc < 1 or self.ulysses_size < 1:
            raise LayoutError(
                f"NPROC ({self.nproc}) and ULYSSES_SIZE ({self.ulysses_size}) must be at least 1"
            )
        if self.cfg_size not in (1, 2):
            raise LayoutError(
                f"CFG_SIZE must be 1 or 2 (the conditional and unconditional branches); "
                f"got {self.cfg_size}"
            )
        if self.ulysses_size * self.cfg_size != self.nproc:
            raise LayoutError(
                f"ULYSSES_SIZE x CFG_SIZE must equal NPROC: {self.ulysses_size} x "
                f"{self.cfg_size} != {self.nproc}. With NPROC={self.nproc} and {num_heads} "
                f"attention heads, use {_choices(self.nproc, num_heads)}"
            )
        if num_heads % self.ulysses_size:
            fits = [u for u in range(1, self.nproc + 1) if num_heads % u == 0]
            raise LayoutError(
                f"ULYSSES_SIZE={self.ulysses_size} does not divide the model's {num_heads} "
                f"attention heads; ULYSSES_SIZE can be {', '.join(map(str, fits))}. With "
                f"NPROC={self.nproc}, use {_choices(self.nproc, num_heads)}"
            )
        if self.t5_cpu and self.t5_fsdp:
            raise LayoutError(
                "T5_CPU keeps the text encoder on the CPU of rank 0 and T5_FSDP shards it "
                "across the cards: set only one of them"
            )


def _choices(nproc: int, num_heads: int) -> str:
    options = [
        f"ULYSSES_SIZE={nproc // cfg} CFG_SIZE={cfg}"
        for cfg in (1, 2)
        if nproc % cfg == 0 and num_heads % (nproc // cfg) == 0
    ]
    return " or ".join(options) if options else f"a different NPROC ({nproc} fits no split)"


def lane_devices(cards: int, lanes: int) -> list[list[int]]:
    """The device indices of each lane when `cards` are split into `lanes` equal engines."""
    if lanes < 1 or cards < lanes or cards % lanes:
        fits = [n for n in range(1, cards + 1) if cards % n == 0]
        raise LayoutError(
            f"LANES={lanes} cannot split {cards} cards into equal engines; LANES can be "
            f"{', '.join(map(str, fits))}"
        )
    per = cards // lanes
    return [list(range(lane * per, (lane + 1) * per)) for lane in range(lanes)]


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the model's parts (see benchmarks/layout_memory.py)."""

    transformer: int
    text_encoder: int
    image_encoder: int
    vae: int


BF16, FP32 = 2, 4


def weight_bytes_per_card(layout: ParallelLayout, sizes: ModelSizes) -> dict[str, int]:
    """Bytes of weights the busiest card holds, per part, as the engine places them:
    DiT and T5 in bf16 (sharded over all ranks with FSDP), CLIP and the VAE in fp32 on
    every rank (as the reference implementation does), T5 off the cards with T5_CPU."""
    n = layout.nproc
    dit = sizes.transformer * BF16
    t5 = sizes.text_encoder * BF16
    return {
        "transformer": -(-dit // n) if layout.dit_fsdp else dit,
        "text_encoder": 0 if layout.t5_cpu else (-(-t5 // n) if layout.t5_fsdp else t5),
        "image_encoder": sizes.image_encoder * FP32,
        "vae": sizes.vae * FP32,
    }
