"""Input image preparation: formats, limits, orientation, alpha and the cover-crop resize."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageInvalid, InvalidRequest
from pipeline.images import BACKGROUND, ImageLimits, prepare_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREY = (128, 128, 128)
TARGETS = [(1280, 720), (720, 1280), (832, 480), (480, 832), (1024, 576), (1920, 1080)]


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _near(pixel: Any, colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, colour, strict=True))


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims another size."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_allowed_formats_are_decoded_to_rgb_of_the_target_size(fmt: str) -> None:
    """JPEG, PNG and WebP come back as RGB images of exactly the requested size and colour."""
    out = prepare_image(_encode(Image.new("RGB", (300, 200), RED), fmt), 832, 480)
    assert (out.mode, out.size) == ("RGB", (832, 480))
    assert _near(out.getpixel((416, 240)), RED)


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_refused_by_name(fmt: str, name: str) -> None:
    """Decodable images outside the allow-list are refused with their format named."""
    with pytest.raises(ImageInvalid) as caught:
        prepare_image(_encode(Image.new("RGB", (64, 64), RED), fmt), 832, 480)
    assert caught.value.code == "image_invalid"
    assert str(caught.value) == f"image format {name} is not supported; send JPEG, PNG or WebP"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (b"\x13\x37" * 500, "not a JPEG, PNG or WebP"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG is not supported"),
    ],
)
def test_garbage_empty_and_svg_are_refused(data: bytes, says: str) -> None:
    """Bytes that are no allowed image are refused with a message that says why."""
    with pytest.raises(ImageInvalid, match=says) as caught:
        prepare_image(data, 832, 480)
    assert caught.value.code == "image_invalid"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_data_is_refused_as_corrupt(fmt: str) -> None:
    """A cut-off upload of an allowed format is refused, not half-decoded."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageInvalid, match="truncated or corrupt") as caught:
        prepare_image(data[: len(data) // 2], 832, 480)
    assert len(str(caught.value)) < 120  # never echoes the image bytes


def test_exif_orientation_is_applied() -> None:
    """A photo stored sideways with EXIF orientation 6 comes out upright (turned 90° clockwise)."""
    stored = Image.new("RGB", (128, 64), GREY)
    stored.paste(RED, (0, 0, 32, 32))  # top-left as stored, top-right once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare_image(_encode(stored, "JPEG", exif=exif, quality=95), 64, 128)
    assert out.size == (64, 128)
    assert _near(out.getpixel((48, 16)), RED)
    assert _near(out.getpixel((16, 16)), GREY)
    assert _near(out.getpixel((48, 112)), GREY)


def test_exif_rotated_large_jpeg_still_covers_the_target() -> None:
    """Reduced-scale JPEG decoding accounts for a 90° EXIF turn and yields the exact size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.new("RGB", (4000, 2000), RED), "JPEG", exif=exif)
    out = prepare_image(data, 480, 832)
    assert out.size == (480, 832)
    assert _near(out.getpixel((0, 0)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_transparent_areas_become_white(fmt: str) -> None:
    """Alpha is composited over white, whatever colour the encoder left under it."""
    image = Image.new("RGBA", (200, 200), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (100, 0, 200, 200))
    out = prepare_image(_encode(image, fmt, lossless=True), 200, 200)
    assert BACKGROUND == (255, 255, 255)
    assert out.getpixel((50, 100)) == BACKGROUND
    assert out.getpixel((150, 100)) == RED


def test_palette_transparency_becomes_white() -> None:
    """A palette PNG with a transparent index is flattened over white too."""
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    out = prepare_image(_encode(image, "PNG", transparency=0), 64, 64)
    assert out.getpixel((10, 10)) == BACKGROUND
    assert out.getpixel((50, 10)) == RED


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animation_uses_the_first_frame(fmt: str) -> None:
    """Animated PNG and WebP give their first frame, not a later one."""
    first, second = Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)
    data = _encode(first, fmt, save_all=True, append_images=[second], duration=100)
    with Image.open(io.BytesIO(data)) as image:
        assert getattr(image, "n_frames", 1) == 2
    assert _near(prepare_image(data, 64, 64).getpixel((32, 32)), RED)


@pytest.mark.parametrize(
    ("claimed", "message"),
    [
        ((9000, 9000), "image is 9000x9000 pixels (81.0 MP); the limit is 64.0 MP"),
        ((10000, 9000), "image is 10000x9000 pixels (90.0 MP); the limit is 64.0 MP"),
        ((20000, 20000), "image is 400.0 MP; the limit is 64.0 MP"),
    ],
)
def test_huge_header_is_refused_before_decoding(claimed: tuple[int, int], message: str) -> None:
    """A tiny file claiming a huge size is refused from its header, Pillow's globals untouched."""
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageInvalid) as caught:
        prepare_image(_png_claiming(*claimed), 832, 480)
    assert str(caught.value) == message
    assert before == Image.MAX_IMAGE_PIXELS


def test_real_big_image_is_refused_by_a_lowered_pixel_limit() -> None:
    """A cheap-to-store 9000x9000 bilevel PNG trips a lowered `max_pixels`."""
    data = _encode(Image.new("1", (9000, 9000)), "PNG")
    with pytest.raises(ImageInvalid, match=r"9000x9000 pixels \(81.0 MP\); the limit is 50.0 MP"):
        prepare_image(data, 832, 480, limits=ImageLimits(max_pixels=50_000_000))


@pytest.mark.parametrize(
    ("size", "limits", "says"),
    [
        ((16, 64), ImageLimits(), "at least 32 pixels"),
        ((900, 100), ImageLimits(), r"aspect 9.0:1\); the limit is 8:1"),
        ((200, 150), ImageLimits(max_side=100), "at most 100 pixels"),
        ((200, 150), ImageLimits(max_bytes=100), "image file is .* MiB; the limit is"),
    ],
)
def test_size_limits_are_enforced(size: tuple[int, int], limits: ImageLimits, says: str) -> None:
    """Too small, too elongated, too large on a side or too many bytes is refused."""
    data = _encode(Image.new("RGB", size, RED), "PNG")
    with pytest.raises(ImageInvalid, match=says):
        prepare_image(data, 832, 480, limits=limits)


@pytest.mark.parametrize("source", [(300, 200), (200, 300), (1000, 1000), (40, 32)])
@pytest.mark.parametrize(("width", "height"), TARGETS)
def test_output_size_is_exact(source: tuple[int, int], width: int, height: int) -> None:
    """Every supported video size comes out exactly, from wide, tall, square or tiny inputs."""
    out = prepare_image(_encode(Image.new("RGB", source, RED), "PNG"), width, height)
    assert (out.mode, out.size) == ("RGB", (width, height))


def test_centre_crop_keeps_the_centre() -> None:
    """Covering a square target from a wide picture keeps its middle and drops its sides."""
    image = Image.new("RGB", (400, 100), GREY)
    image.paste(BLUE, (0, 0, 100, 100))
    image.paste(BLUE, (300, 0, 400, 100))
    image.paste(RED, (190, 40, 210, 60))
    out = np.asarray(prepare_image(_encode(image, "PNG"), 100, 100))
    assert _near(out[50, 50], RED)
    assert not (out[..., 2] > 200).any()  # no trace of the blue sides


@pytest.mark.parametrize(
    ("image", "fmt", "colour"),
    [
        (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", RED),
        (Image.new("L", (64, 64), 128), "PNG", GREY),
        (Image.new("1", (64, 64), 1), "PNG", (255, 255, 255)),
        (Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)), "PNG", GREY),
    ],
)
def test_other_modes_are_converted_to_rgb(image: Image.Image, fmt: str, colour: Any) -> None:
    """CMYK, greyscale, bilevel and 16-bit greyscale inputs keep their colour in RGB."""
    out = prepare_image(_encode(image, fmt), 64, 64)
    assert out.mode == "RGB"
    assert _near(out.getpixel((32, 32)), colour, tol=8)


@pytest.mark.parametrize(("width", "height"), [(0, 480), (832, -1)])
def test_target_size_must_be_positive(width: int, height: int) -> None:
    """A non-positive target is the caller's error, not the image's."""
    with pytest.raises(InvalidRequest):
        prepare_image(_encode(Image.new("RGB", (64, 64)), "PNG"), width, height)
