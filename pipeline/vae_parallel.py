"""Wan VAE decode split across ranks by latent rows, with the same result as one rank's decode.

Owns the row-band split of the decoder (halo exchange for every spatial convolution, the
full-height gather for the mid-block attention, the per-rank causal frame cache) and the
final gather of the decoded bands. Must never leave the VAE changed: every hook and
padding tweak is installed on entry and removed on exit, also when the decode raises, and
the VAE's frame cache is cleared before and after, as `AutoencoderKLWan._decode` does.

Each rank decodes a contiguous band of latent rows. A spatial convolution with padding p
on a band would see zeros where the neighbouring band's rows should be, so before every
such convolution the ranks all_gather their first and last p rows (and the same rows of
the cached frames the causal convolution prepends) and pad with the neighbours' rows;
only the real image border keeps zero padding. Nearest-exact 2x upsampling maps latent
row r to rows 2r and 2r+1, so a band stays a band at every scale. The mid-block
attention mixes all positions of a frame, so it runs on the all-gathered full map and
each rank keeps its own rows. Everything else in the decoder (RMS norm over channels,
SiLU, 1x1 and temporal-only convolutions, the causal frame cache) is row-local.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def decode(vae: Any, z: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Same result as `vae.decode(z, return_dict=False)[0]`, with the work split across `group`.

    `z` is the de-normalised latent (B, C, T, h, w), identical on every rank of `group`;
    every rank returns the full video (B, 3, F, H, W). The latent rows are split into
    contiguous bands, one per rank (the first h % world bands get one extra row).

    Every rank runs the plain `vae.decode` instead (same result, no speed-up) when `group`
    is None or has one rank, when there are fewer latent rows than ranks (each band needs
    at least one row to supply its neighbours' halo), or when `vae.use_tiling` would make
    `vae.decode` take its tiled, blended path (the split decode is exact, tiling is not).
    Measured on the tiny VAE in fp32 (2, 3 and 4 ranks): max |split - plain| <= 1e-6.

    All ranks must call this together with the same `z`; if one rank fails, the others
    wait in a collective until the group's timeout.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1 or z.shape[-2] < world or _tiling_applies(vae, z):
        out: torch.Tensor = vae.decode(z, return_dict=False)[0]
        return out
    assert group is not None
    bands = _split_rows(z.shape[-2], world)
    rank = dist.get_rank(group)
    with _banded(vae, _Bands(bands, rank, group)):
        band = _decode_band(vae, z[..., _start(bands, rank) : _start(bands, rank + 1), :])
    return _gather_rows(band, bands, group)


def decode_chunks(
    vae: Any, z: torch.Tensor, group: dist.ProcessGroup | None = None
) -> Iterator[torch.Tensor]:
    """`decode` one latent frame at a time: yields the video's frames (B, 3, f, H, W) in
    order as the decoder makes them (1 frame, then 4 per latent frame), so a caller can
    encode them while the next ones are decoded. Concatenated along dim 2 they are exactly
    `decode(vae, z, group)`. With `vae.use_tiling` applying, the tiled decode comes whole.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if _tiling_applies(vae, z):
        yield decode(vae, z, group)
        return
    if world == 1 or z.shape[-2] < world:
        yield from _decode_frames(vae, z)
        return
    assert group is not None
    bands = _split_rows(z.shape[-2], world)
    rank = dist.get_rank(group)
    with _banded(vae, _Bands(bands, rank, group)):
        band_z = z[..., _start(bands, rank) : _start(bands, rank + 1), :]
        for band in _decode_frames(vae, band_z):
            yield _gather_rows(band, bands, group)


@dataclass(frozen=True)
class _Bands:
    """Latent rows per rank and this rank's place; rows at any scale are latent rows * scale."""

    rows: list[int]
    rank: int
    group: dist.ProcessGroup

    def scaled(self, x: torch.Tensor) -> list[int]:
        """Every rank's band height at the scale of `x` (a band of this rank, rows at dim -2)."""
        scale = x.shape[-2] // self.rows[self.rank]
        return [r * scale for r in self.rows]


def _split_rows(rows: int, world: int) -> list[int]:
    return [rows // world + (1 if i < rows % world else 0) for i in range(world)]


def _start(bands: list[int], rank: int) -> int:
    return sum(bands[:rank])


def _tiling_applies(vae: Any, z: torch.Tensor) -> bool:
    """Whether `vae.decode(z)` would take the tiled path (mirrors `_decode`'s test)."""
    if not getattr(vae, "use_tiling", False):
        return False
    ratio = vae.spatial_compression_ratio
    return bool(
        z.shape[-1] > vae.tile_sample_min_width // ratio
        or z.shape[-2] > vae.tile_sample_min_height // ratio
    )


def _decode_band(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` on one band (its hooks already installed), untiled."""
    return torch.cat(list(_decode_frames(vae, z)), 2)


def _decode_frames(vae: Any, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """`AutoencoderKLWan._decode` (untiled) one latent frame at a time: the causal
    convolutions read the previous frames from the feature cache, so the frames come out
    in order and equal to the whole decode's. With band hooks installed, for one band."""
    # The accelerate offload hook that `vae.decode` triggers (moves the VAE to its device).
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(
                x[:, :, i : i + 1],
                feat_cache=vae._feat_map,
                feat_idx=vae._conv_idx,
                first_chunk=i == 0,
            )
            if vae.config.patch_size is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()


def _gather_rows(band: torch.Tensor, bands: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """The full tensor from every rank's band (dim -2): all_gather padded to the tallest band."""
    scale = band.shape[-2] // bands[dist.get_rank(group)]
    heights = [r * scale for r in bands]
    tallest = max(heights)
    padded = F.pad(band, (0, 0, 0, tallest - band.shape[-2])).contiguous()
    parts = [torch.empty_like(padded) for _ in heights]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., :h, :] for p, h in zip(parts, heights, strict=True)], dim=-2)


def _with_halo(x: torch.Tensor, halo: int, bands: _Bands) -> torch.Tensor:
    """`x` (this rank's band, rows at dim -2) with `halo` neighbour rows above and below.

    Each rank contributes its first and last `halo` rows to one all_gather; the top and
    bottom ranks pad with zeros there, as the unsplit convolution's zero padding does.
    """
    heights = bands.scaled(x)
    if min(heights) < halo:
        raise ValueError(f"bands of {heights} rows cannot supply a halo of {halo} rows")
    edges = torch.cat([x[..., :halo, :], x[..., -halo:, :]], dim=-2).contiguous()
    parts = [torch.empty_like(edges) for _ in heights]
    dist.all_gather(parts, edges, group=bands.group)
    zeros = torch.zeros_like(edges[..., :halo, :])
    last = len(heights) - 1
    above = parts[bands.rank - 1][..., halo:, :] if bands.rank > 0 else zeros
    below = parts[bands.rank + 1][..., :halo, :] if bands.rank < last else zeros
    return torch.cat([above, x, below], dim=-2)


# --- hooks on the decoder's modules -------------------------------------------------------

_Restore = Callable[[], None]


def _causal_conv_hook(conv: Any, bands: _Bands) -> _Restore:
    """Row halo for a WanCausalConv3d: neighbours' rows replace its zero row padding.

    `_padding` is F.pad's (w, w, h, h, t, 0); the row entries are zeroed while installed and
    the pre-hook adds real rows instead. The cached frames the forward prepends (`cache_x`)
    are band rows too, so they get their halo in the same exchange, concatenated in time.
    """
    original = conv._padding
    halo = original[2]
    if halo == 0:
        return lambda: None
    if original[3] != halo or conv.stride[1] != 1 or conv.dilation[1] != 1:
        raise NotImplementedError(f"row split of {conv!r}")

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, rest = args[0], args[1:]
        cache = rest[0] if rest else kwargs.get("cache_x")
        if cache is None:
            return (_with_halo(x, halo, bands), *rest), kwargs
        cache = cache.to(x.device)
        both = _with_halo(torch.cat([cache, x], dim=2), halo, bands)
        cache, x = both[:, :, : cache.shape[2]], both[:, :, cache.shape[2] :]
        if rest:
            return (x, cache, *rest[1:]), kwargs
        return (x,), {**kwargs, "cache_x": cache}

    conv._padding = (original[0], original[1], 0, 0, original[4], original[5])
    handle = conv.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def restore() -> None:
        handle.remove()
        conv._padding = original

    return restore


def _conv2d_hook(conv: nn.Conv2d, bands: _Bands) -> _Restore:
    """Row halo for the upsamplers' Conv2d ((B*T, C, H, W) frames): same as the causal conv."""
    original = conv.padding
    assert isinstance(original, tuple)
    halo = int(original[0])
    if halo == 0:
        return lambda: None
    if conv.padding_mode != "zeros" or conv.stride[0] != 1 or conv.dilation[0] != 1:
        raise NotImplementedError(f"row split of {conv!r}")

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (_with_halo(args[0], halo, bands), *args[1:])

    conv.padding = (0, original[1])
    handle = conv.register_forward_pre_hook(pre_hook)

    def restore() -> None:
        handle.remove()
        conv.padding = original

    return restore


def _attention_hook(attn: nn.Module, bands: _Bands) -> _Restore:
    """Full-height attention: run on the all-gathered frame map, keep this rank's rows."""
    kept: list[slice] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        x = args[0]
        heights = bands.scaled(x)
        start = sum(heights[: bands.rank])
        kept.append(slice(start, start + x.shape[-2]))
        return (_gather_rows(x, bands.rows, bands.group), *args[1:])

    def post_hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out[..., kept.pop(), :]

    handles = [attn.register_forward_pre_hook(pre_hook), attn.register_forward_hook(post_hook)]

    def restore() -> None:
        for h in handles:
            h.remove()

    return restore


@contextmanager
def _banded(vae: Any, bands: _Bands) -> Iterator[None]:
    """Install the row-split hooks on `vae.decoder`; remove them and restore padding on exit."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanAttentionBlock,
        WanCausalConv3d,
    )

    restores: list[_Restore] = []
    try:
        for module in vae.decoder.modules():
            if isinstance(module, WanCausalConv3d):
                restores.append(_causal_conv_hook(module, bands))
            elif isinstance(module, nn.Conv2d):
                restores.append(_conv2d_hook(module, bands))
            elif isinstance(module, WanAttentionBlock):
                restores.append(_attention_hook(module, bands))
            elif isinstance(module, nn.modules.conv._ConvNd | nn.MultiheadAttention):
                # Any other row-mixing layer would silently break exactness: refuse it.
                raise NotImplementedError(f"row split of {type(module).__name__}")
        yield
    finally:
        for restore in reversed(restores):
            restore()
