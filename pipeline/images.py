"""Input image preparation: untrusted bytes to an RGB picture of exactly the target size.

Owns the format allow-list, the size and decompression-bomb limits, orientation, alpha, the
cover-and-centre-crop resize and the memory one decode may take. Must never trust a filename
or touch Pillow's global settings. Refusals name the format the bytes are in through
`pipeline.formats`. Just over 400 lines, most of them the memory account below.

Memory. The decoded frame is the only full-size buffer, and `max_decode_bytes` bounds what
the decoder holds, from the header, before any pixel is read. JPEG is decoded by libjpeg at
1/2, 1/4 or 1/8 scale as long as that still covers the target (a progressive JPEG also
keeps all its DCT coefficients, 3 to 8 bytes a pixel); PNG has no reduced decode, so its
frame (4 bytes a pixel for RGB and RGBA, 1 for palette and grey, 2 for 16-bit grey) is
bounded by `max_pixels`; WebP holds four frames (libwebp's two canvases, the copy it hands
over and Pillow's). Nothing after the decode copies the frame: the cover box is
box-averaged (Pillow's reducing step) or resampled straight from it, modes that need
converting (alpha over white, palette, bilevel, 16-bit grey, CMYK) are converted a strip
of about a megapixel at a time on the way, with the same pixels as a whole-frame
conversion, and EXIF orientation is applied to the finished picture (after a quarter
turn the two resampling passes run in the other order: within 2 levels). The freed frame goes
back to the system at once (glibc would keep it in the calling thread's heap), and one
decode runs at a time per process, so a node's lanes share one decode's peak.

Peak RSS of one decode over the process before it (`benchmarks/image_memory.py`, target
1280x720 / 1920x1080): 64 MP PNG RGB 293 / 285 MiB, RGBA 297 / 320, palette 116 / 136,
16-bit grey 194 / 218; 64 MP JPEG 24 / 31, progressive 4:2:0 198 / 198 (4:4:4 is refused
above 44 MP); 16 MP WebP 244 / 244 (refused above 16.7 MP); 24 MP camera JPEG 32 / 39.
"""

from __future__ import annotations

import ctypes
import io
import math
import re
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image

from .errors import ImageInvalid, InvalidRequest
from .formats import ALLOWED_NAMES, PICTURE_NAMES, SNIFF_BYTES, format_noun, sniff_format

__all__ = ["ALLOWED_FORMATS", "BACKGROUND", "ImageLimits", "prepare_image"]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
"""Pillow format ids we decode; everything else is refused before any pixel is read."""

BACKGROUND = (255, 255, 255)
"""Transparent areas are composited over this colour (white), so the result never depends
on whatever RGB values an encoder left under alpha 0."""


_RESAMPLE = Image.Resampling.LANCZOS
_LANCZOS_SUPPORT = 3.0  # the filter's radius in source pixels, times the scale when shrinking
# Pillow first shrinks by an integer factor with box averaging, then LANCZOS for the last
# factor of at most 3: near-identical output, much faster on phone-camera inputs.
_REDUCING_GAP = 3.0
_STRIP_PIXELS = 1 << 20
"""Pixels converted at a time when a mode needs converting: 4 MiB as RGBA, 8 as float grey."""

_TRIM_PIXELS = 4_000_000
"""Decodes from this size on give the freed frame back to the system at once (`_TRIM`)."""
_ONE_DECODE = threading.Lock()
"""Held from opening to the finished picture: the lanes of a node run in one process."""
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation to the transposition that makes the picture upright (as ImageOps)."""
_SWAPS_SIDES = frozenset(_TRANSPOSE[o] for o in (5, 6, 7, 8))
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_ORIENTATION_TAG = 0x0112
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
"""Pillow's storage per pixel where it is not 4 bytes (RGB is stored as 4 too)."""
_COSTLY = {"JPEG": ("progressive JPEG", "a baseline JPEG"), "WEBP": ("WebP", "a PNG or JPEG")}
"""How a refusal over `max_decode_bytes` names the format, and what to send instead."""

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
    max_decode_bytes: int = 256 * 1024 * 1024
    """What the decoder may hold at once, estimated from the header (`_decode_bytes`): a
    64 MP PNG fits (244 MiB); WebP, which costs four frames, up to 16.7 MP; a progressive
    JPEG, which keeps every DCT coefficient, up to 64 MP at 4:2:0, 44 MP at 4:4:4."""


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
    with _ONE_DECODE, warnings.catch_warnings():
        # Our own header check below enforces the pixel limit; Pillow's looser warning
        # must neither print nor, under warnings-as-errors, escape as a different error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image, turn = _decode(data, width, height, limits)
        except Image.DecompressionBombError as exc:
            found = _BOMB_PIXELS.search(str(exc))
            size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too many pixels"
            raise ImageInvalid(
                f"image is {size}; the limit is {limits.max_pixels / 1e6:.1f} MP"
            ) from None
        except _DECODE_ERRORS:
            raise ImageInvalid(_unreadable(data)) from None
        try:
            return _fit(image, width, height, turn)
        finally:
            _release(image, decoded=True)


def _decode(
    data: bytes, width: int, height: int, limits: ImageLimits
) -> tuple[Image.Image, Image.Transpose | None]:
    """The decoded image, which the caller closes, and the turn that makes it upright."""
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    decoding = False
    try:
        _check_header(image.size, limits)
        _check_decode_bytes(image, limits)
        orientation = image.getexif().get(_ORIENTATION_TAG)
        turn = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
        if image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while still covering the target:
            # a 48 MP photo for a 720p video then costs a fraction of the time and memory.
            image.draft(None, (height, width) if turn in _SWAPS_SIDES else (width, height))
        decoding = True
        image.load()  # the current frame, which is the first one right after open
    except BaseException:
        _release(image, decoded=decoding)
        raise
    return image, turn


def _release(image: Image.Image, *, decoded: bool) -> None:
    """Close `image`, freeing its frame; a large one goes back to the system at once."""
    large = decoded and image.width * image.height >= _TRIM_PIXELS
    image.close()
    if large and _TRIM is not None:
        _TRIM(0)


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


def _check_decode_bytes(image: Image.Image, limits: ImageLimits) -> None:
    need = _decode_bytes(image)
    if need <= limits.max_decode_bytes:
        return
    w, h = image.size
    kind, instead = _COSTLY.get(image.format or "", (image.format, "a JPEG"))
    raise ImageInvalid(
        f"image is a {w}x{h} pixel {kind} ({w * h / 1e6:.1f} MP), which takes "
        f"{_mib(need)} to decode; the limit is {_mib(limits.max_decode_bytes)}; "
        f"send a smaller image or {instead}"
    )


def _decode_bytes(image: Image.Image) -> int:
    """What decoding `image` holds at once, from its header alone.

    PNG: Pillow's frame, 4 bytes a pixel (1 for palette, grey and bilevel, 2 for 16-bit
    grey). WebP: four frames of 4 bytes a pixel (libwebp's two canvases, the copy it hands
    over and Pillow's frame). Progressive JPEG: libjpeg's buffer of every DCT coefficient,
    2 bytes per sample of each component; a baseline JPEG is decoded a band at a time at
    reduced scale, which the target's size bounds, so counts as nothing here.
    """
    w, h = image.size
    if image.format == "WEBP":
        return 4 * w * h * 4
    if image.format != "JPEG":
        return w * h * _BYTES_PER_PIXEL.get(image.mode, 4)
    if not image.info.get("progressive"):
        return 0
    layers: list[tuple[int, int, int, int]] = getattr(image, "layer", [])
    h_max = max((layer[1] for layer in layers), default=1)
    v_max = max((layer[2] for layer in layers), default=1)
    samples = sum(
        math.ceil(w * hs / h_max / 8) * math.ceil(h * vs / v_max / 8) * 64
        for _, hs, vs, _ in layers
    )
    return 2 * samples


def _fit(image: Image.Image, width: int, height: int, turn: Image.Transpose | None) -> Image.Image:
    """`image` in RGB, covering and centre-cropped to `width` x `height`, then turned upright.

    Works in the stored orientation with the target's sides swapped where the turn swaps
    them, so the full-size frame is never transposed, converted or copied.
    """
    size = (height, width) if turn in _SWAPS_SIDES else (width, height)
    box = _cover_box(image.size, size)
    if image.mode in ("RGB", "L") and not image.has_transparency_data:
        # Pillow's reducing step and resample each allocate only what they produce.
        fitted = image.resize(size, _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
    else:
        fitted = _fit_converting(image, size, box)
    if turn is not None:
        fitted = fitted.transpose(turn)
    return fitted if fitted.mode == "RGB" else fitted.convert("RGB")


def _cover_box(source: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    # Same geometry as ImageOps.fit: the largest centred box of the target's aspect, of
    # which only that box is resampled, so no pixel outside it is computed.
    (w, h), (width, height) = source, size
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def _fit_converting(
    image: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]
) -> Image.Image:
    """What `_to_rgb(image).resize(size, LANCZOS, box=box, reducing_gap=3)` returns, pixel for
    pixel, without the full-size RGB copy: Pillow's stages are done a strip of rows at a
    time, each strip converted on its own.

    With a reducing factor, the first stage is a box average over whole blocks of rows and
    the resample then runs on its small result. Without one, Pillow resamples in two passes,
    along rows and along columns: the first is done here strip by strip, the second on its
    output, which is only as large as the target on one side.
    """
    (width, height), (left, top, right, bottom) = size, box
    fx = int((right - left) / width / _REDUCING_GAP) or 1
    fy = int((bottom - top) / height / _REDUCING_GAP) or 1
    if fx > 1 or fy > 1:
        x0, y0, x1, y1 = _safe_box(image.size, size, box)
        reduced = Image.new("RGB", (math.ceil((x1 - x0) / fx), math.ceil((y1 - y0) / fy)))
        step = _strip_rows(x1 - x0, fy)
        for y in range(y0, y1, step):
            strip = _to_rgb(image.crop((x0, y, x1, min(y + step, y1))))
            reduced.paste(strip.reduce((fx, fy)), (0, (y - y0) // fy))
        inner = ((left - x0) / fx, (top - y0) / fy, (right - x0) / fx, (bottom - y0) / fy)
        return reduced.resize(size, _RESAMPLE, box=inner)
    # Pillow's order of the two passes (Resample.c): columns first when the height shrinks
    # by more than twice as many pixels as the width (Pillow 11.2 on), else rows first. The
    # first pass writes a buffer of the output's width or height; only the rows or columns
    # within the filter's reach of the box are filled, and the buffer keeps the image's
    # other side so the second pass weighs them exactly as Pillow would.
    w, h = image.size
    if _COLUMNS_FIRST and h - height > 0 and h - height > (w - width) * 2:
        first, last = _reach(left, right, width, w)
        cols = Image.new("RGB", (w, height))
        step = _strip_rows(h, 1)  # columns per strip, here
        for x in range(first, last, step):
            strip = _to_rgb(image.crop((x, 0, min(x + step, last), h)))
            down = (0, top, strip.width, bottom)
            cols.paste(strip.resize((strip.width, height), _RESAMPLE, box=down), (x, 0))
        return cols.resize(size, _RESAMPLE, box=(left, 0, right, height))
    first, last = _reach(top, bottom, height, h)
    rows = Image.new("RGB", (width, h))
    step = _strip_rows(w, 1)
    for y in range(first, last, step):
        strip = _to_rgb(image.crop((0, y, w, min(y + step, last))))
        across = (left, 0, right, strip.height)
        rows.paste(strip.resize((width, strip.height), _RESAMPLE, box=across), (0, y))
    return rows.resize(size, _RESAMPLE, box=(0, top, width, bottom))


def _reach(start: float, end: float, out: int, size: int) -> tuple[int, int]:
    """The source pixels a LANCZOS pass from [start, end) to `out` pixels reads, with a margin
    for rounding: Resample.c's precompute_coeffs, clipped to `size`."""
    support = _LANCZOS_SUPPORT * max(1.0, (end - start) / out)
    return max(0, math.floor(start - support) - 1), min(size, math.ceil(end + support) + 1)


def _safe_box(
    source: tuple[int, int], size: tuple[int, int], box: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    # Pillow's Image._get_safe_box for LANCZOS, in the same float operations: the box
    # widened by what the resample after a reduce reads, in whole pixels.
    support = _LANCZOS_SUPPORT - 0.5
    scale_x = (box[2] - box[0]) / size[0]
    scale_y = (box[3] - box[1]) / size[1]
    support_x, support_y = support * scale_x, support * scale_y
    return (
        max(0, int(box[0] - support_x)),
        max(0, int(box[1] - support_y)),
        min(source[0], math.ceil(box[2] + support_x)),
        min(source[1], math.ceil(box[3] + support_y)),
    )


def _strip_rows(width: int, multiple: int) -> int:
    """Rows per strip: about `_STRIP_PIXELS` pixels, a whole multiple of `multiple`."""
    return max(1, _STRIP_PIXELS // (width * multiple)) * multiple


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


def _unreadable(data: bytes) -> str:
    name = sniff_format(data[:SNIFF_BYTES])
    if name is None:
        return "image data is not a JPEG, PNG or WebP file; send one of those formats"
    if name in ALLOWED_NAMES:
        return "image data is truncated or corrupt; send the complete file again"
    if name in PICTURE_NAMES:
        return f"image format {name} is not supported; send JPEG, PNG or WebP"
    return f"image data is {format_noun(name)}, not an image; send a JPEG, PNG or WebP file"


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS: nothing to do there).

    glibc keeps a freed frame in the heap of the thread that freed it instead of unmapping
    it, so every thread of the pool that calls prepare_image would keep one resident.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast("Callable[[int], int]", trim)


_TRIM = _malloc_trim()


def _columns_first_when_taller() -> bool:
    """Whether this Pillow resamples columns first when the height shrinks by more than
    twice as many pixels as the width (older ones always do rows first): the strips must
    follow its order to give its pixels. Probed on a 10x40 image whose rounding tells."""
    pixels = bytes(
        (255 if (x + y) % 2 else 0) if y % 3 else 128 for y in range(40) for x in range(10)
    )
    probe = Image.frombytes("L", (10, 40), pixels)
    direct = probe.resize((8, 4), _RESAMPLE).tobytes()
    return direct == probe.resize((10, 4), _RESAMPLE).resize((8, 4), _RESAMPLE).tobytes()


_COLUMNS_FIRST = _columns_first_when_taller()
