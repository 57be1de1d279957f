"""Input image preparation: untrusted bytes to an RGB picture of exactly the target size.

Owns the format allow-list, the size and decompression-bomb limits, orientation, alpha and
the cover-and-centre-crop resize. Must never trust a filename or touch Pillow's global settings.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageInvalid, InvalidRequest

__all__ = ["ALLOWED_FORMATS", "BACKGROUND", "ImageLimits", "prepare_image"]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
"""Pillow format ids we decode; everything else is refused before any pixel is read."""

BACKGROUND = (255, 255, 255)
"""Transparent areas are composited over this colour (white), so the result never depends
on whatever RGB values an encoder left under alpha 0."""

_RESAMPLE = Image.Resampling.LANCZOS
# Pillow first shrinks by an integer factor with box averaging, then LANCZOS for the last
# factor of at most 3: near-identical output, much faster on phone-camera inputs.
_REDUCING_GAP = 3.0

# Only used to word the refusal; acceptance is Pillow's detection restricted to the
# allow-list. Formats not named here get the generic message.
_REFUSED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
)
_ALLOWED_SIGNATURES: tuple[tuple[bytes, int], ...] = (
    (b"\xff\xd8\xff", 0),
    (b"\x89PNG\r\n\x1a\n", 0),
    (b"WEBP", 8),
)
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the picture by 90°

# What Pillow raises on truncated, corrupt or hostile data, including from EXIF parsing.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be. Sizes are checked from the header, before decoding."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    min_side: int = 32
    max_side: int = 16384
    max_aspect: float = 8.0
    """Long side over short side."""


def prepare_image(
    data: bytes, width: int, height: int, *, limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Decode a JPEG, PNG or WebP and return it as RGB, covering and centre-cropped to size.

    Applies EXIF orientation, keeps the first frame of an animation and composites alpha
    over `BACKGROUND`. Raises `ImageInvalid` for anything not acceptable as input and
    `InvalidRequest` for a target size below 1.
    """
    if width < 1 or height < 1:
        raise InvalidRequest(f"target size must be positive; got {width}x{height}")
    if not data:
        raise ImageInvalid("image is empty; send a JPEG, PNG or WebP file")
    if len(data) > limits.max_bytes:
        raise ImageInvalid(
            f"image file is {_mib(len(data))}; the limit is {_mib(limits.max_bytes)}; "
            "send a smaller or more compressed image"
        )
    with warnings.catch_warnings():
        # Our own header check below enforces the pixel limit; Pillow's looser warning
        # must neither print nor, under warnings-as-errors, escape as a different error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = _decode(data, width, height, limits)
        except Image.DecompressionBombError as exc:
            found = _BOMB_PIXELS.search(str(exc))
            size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too many pixels"
            raise ImageInvalid(
                f"image is {size}; the limit is {limits.max_pixels / 1e6:.1f} MP"
            ) from None
        except _DECODE_ERRORS:
            raise ImageInvalid(_unreadable(data)) from None
    return _cover(_to_rgb(image), width, height)


def _decode(data: bytes, width: int, height: int, limits: ImageLimits) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        _check_header(image.size, limits)
        orientation = image.getexif().get(_ORIENTATION_TAG)
        if image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while still covering the target:
            # a 48 MP photo for a 720p video then costs a fraction of the time and memory.
            need = (height, width) if orientation in _SWAPS_SIDES else (width, height)
            image.draft(None, need)
        image.load()  # the current frame, which is the first one right after open
        return ImageOps.exif_transpose(image)


def _check_header(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise ImageInvalid(
            f"image is {w}x{h} pixels ({w * h / 1e6:.1f} MP); "
            f"the limit is {limits.max_pixels / 1e6:.1f} MP"
        )
    if min(w, h) < limits.min_side:
        raise ImageInvalid(
            f"image is {w}x{h} pixels; each side must be at least {limits.min_side} pixels"
        )
    if max(w, h) > limits.max_side:
        raise ImageInvalid(
            f"image is {w}x{h} pixels; each side must be at most {limits.max_side} pixels"
        )
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageInvalid(
            f"image is {w}x{h} pixels (aspect {max(w, h) / min(w, h):.1f}:1); "
            f"the limit is {limits.max_aspect:g}:1; crop it closer to the video's shape"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith("I"):
        # 16-bit greyscale PNG: Pillow's own conversion clips at 255 instead of scaling.
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _cover(image: Image.Image, width: int, height: int) -> Image.Image:
    # Same geometry as ImageOps.fit, which lacks reducing_gap: take the largest centred box
    # of the target's aspect and resample only that, so no pixel outside it is computed.
    w, h = image.size
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return image.resize(
        (width, height),
        _RESAMPLE,
        box=(left, top, left + box_w, top + box_h),
        reducing_gap=_REDUCING_GAP,
    )


def _unreadable(data: bytes) -> str:
    head = data[:16]
    for signature, offset, name in _REFUSED_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return f"image format {name} is not supported; send JPEG, PNG or WebP"
    if head.lstrip().lower().startswith((b"<svg", b"<?xml", b"<!doctype")):
        return "image format SVG is not supported; send JPEG, PNG or WebP"
    looks_allowed = any(
        head[offset : offset + len(signature)] == signature
        for signature, offset in _ALLOWED_SIGNATURES
    )
    if looks_allowed:
        return "image data is truncated or corrupt; send the complete file again"
    return "image data is not a JPEG, PNG or WebP file; send one of those formats"


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
