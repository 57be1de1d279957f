"""The row-split VAE decode against one process's decode of the same latent, on gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from i2v_fleet.pipeline import vae_parallel
from i2v_fleet.pipeline.tiny import tiny_vae

from .ranks import run_ranks

TOLERANCE = 1e-5  # fp32; measured about 1e-6 (the convolutions see other shapes per band)

# (T, h, w): even rows, uneven rows (bands 3/3/2/2 on four ranks), and three rows (2/1 on
# two ranks; fewer rows than four ranks, so the plain decode on every rank).
SHAPES = [(2, 8, 8), (3, 10, 6), (1, 3, 4)]


def _latent(t: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(t * 100 + h + w))


def _fingerprint(vae: Any) -> list[tuple[Any, ...]]:
    """What the split decode touches: module types, padding, hooks, instance forwards."""
    return [
        (
            name,
            type(m),
            getattr(m, "_padding", None),
            getattr(m, "padding", None),
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            "forward" in vars(m),
        )
        for name, m in vae.named_modules()
    ]


class _Boom(RuntimeError):
    pass


def _rank_decodes(rank: int, world_size: int) -> dict[str, Any]:
    """Per group size and shape: this rank's split decode; and whether the VAE is unchanged.

    One spawn of four ranks serves both sizes (spawning and importing diffusers is most
    of the cost): the whole world, then the pairs {0, 1} and {2, 3}, where ranks 2 and 3
    are group ranks 0 and 1.
    """
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    vae = tiny_vae().eval()
    before = _fingerprint(vae)
    small = _latent(*SHAPES[-1])
    result: dict[str, Any] = {}
    with torch.no_grad():
        decoded_before = vae.decode(small, return_dict=False)[0]
        for size, group in groups.items():
            for shape in SHAPES:
                # As numpy: torch tensors would cross the result queue as shared memory
                # that is gone once the rank exits.
                out = vae_parallel.decode(vae, _latent(*shape), group)
                result[f"{size} ranks {shape}"] = out.numpy()

        # A failure mid-decode (on every rank alike, after some halo exchanges) still
        # leaves the VAE as it was.
        def boom(*_: Any) -> None:
            raise _Boom

        handle = vae.decoder.up_blocks[1].register_forward_pre_hook(boom)
        try:
            vae_parallel.decode(vae, _latent(*SHAPES[0]), dist.group.WORLD)
        except _Boom:
            result["raised"] = True
        handle.remove()
        result["restored"] = _fingerprint(vae) == before
        result["cache cleared"] = all(f is None for f in vae._feat_map)
        # Same weights and behaviour afterwards: the plain decode is what it was before.
        after = vae.decode(small, return_dict=False)[0]
        result["same decode"] = torch.equal(after, decoded_before)
    return result


@pytest.mark.distributed
@pytest.mark.slow  # four spawned ranks importing diffusers: 20-45 s on 2 cores
def test_split_decode_matches_plain_decode_on_2_and_4_ranks() -> None:
    vae = tiny_vae().eval()
    with torch.no_grad():
        plain = {s: vae.decode(_latent(*s), return_dict=False)[0] for s in SHAPES}
    for rank, result in enumerate(run_ranks(_rank_decodes, 4)):
        for size in (2, 4):
            for shape, want in plain.items():
                got = torch.from_numpy(result[f"{size} ranks {shape}"])
                assert got.shape == want.shape, (rank, size, shape)
                diff = (got - want).abs().max().item()
                assert diff <= TOLERANCE, (rank, size, shape, diff)
        assert result.get("raised"), rank
        assert result["restored"], rank
        assert result["cache cleared"], rank
        assert result["same decode"], rank


def test_without_group_is_the_plain_decode() -> None:
    vae = tiny_vae().eval()
    z = _latent(*SHAPES[0])
    with torch.no_grad():
        assert torch.equal(vae_parallel.decode(vae, z), vae.decode(z, return_dict=False)[0])


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_frames_come_one_latent_frame_at_a_time_and_equal_the_whole_decode(
    shape: tuple[int, int, int],
) -> None:
    """The decoder's frames, yielded as made (1, then 4 per latent frame), are exactly the
    whole decode's: what lets the MP4 be encoded while the rest is decoded."""
    vae = tiny_vae().eval()
    z = _latent(*shape)
    with torch.no_grad():
        chunks = list(vae_parallel.decode_chunks(vae, z))
        whole = vae.decode(z, return_dict=False)[0]
    assert [c.shape[2] for c in chunks] == [1] + [4] * (shape[0] - 1)
    assert torch.equal(torch.cat(chunks, dim=2), whole)


def test_a_naive_row_split_is_far_off() -> None:
    """Why the halos matter: decoding the bands independently is off by far more than 1e-5."""
    vae = tiny_vae().eval()
    z = _latent(*SHAPES[1])
    with torch.no_grad():
        plain = vae.decode(z, return_dict=False)[0]
        bands = [vae.decode(part, return_dict=False)[0] for part in z.split(5, dim=-2)]
    assert (torch.cat(bands, dim=-2) - plain).abs().max() > 1e-2


def test_split_rows_is_contiguous_and_near_even() -> None:
    assert vae_parallel._split_rows(10, 4) == [3, 3, 2, 2]
    assert vae_parallel._split_rows(8, 2) == [4, 4]
    assert sum(vae_parallel._split_rows(90, 8)) == 90
