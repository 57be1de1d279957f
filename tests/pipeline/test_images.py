"""Input image preparation: formats, limits, orientation, alpha and the cover-crop resize."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from i2v_fleet.pipeline import images
from i2v_fleet.pipeline.errors import ImageInvalid, InvalidRequest
from i2v_fleet.pipeline.formats import (
    ALLOWED_NAMES,
    PICTURE_NAMES,
    SNIFF_BYTES,
    format_noun,
    sniff_format,
)
from i2v_fleet.pipeline.images import BACKGROUND, ImageLimits, prepare_image

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


# -- naming what the bytes are ---------------------------------------------------------

FTYP = b"\x00\x00\x00\x18ftyp"


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"GIF87a\x08\x00", "GIF"),
        (b"GIF89a\x08\x00", "GIF"),
        (b"BM\x36\x00\x0c\x00\x00\x00\x00\x00", "BMP"),
        (b"II*\x00\x08\x00", "TIFF"),
        (b"MM\x00*\x00\x00", "TIFF"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x00\x00\x01\x00\x01\x00", "ICO"),
        (b"8BPS\x00\x01", "PSD"),
        (b"\xff\x0a\xfa\x7f", "JPEG XL"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
        (FTYP + b"heic\x00\x00", "HEIC"),
        (FTYP + b"heix\x00\x00", "HEIC"),
        (FTYP + b"mif1\x00\x00", "HEIF"),
        (FTYP + b"avif\x00\x00", "AVIF"),
        (FTYP + b"isom\x00\x00", "MP4"),
        (FTYP + b"qt  \x00\x00", "MP4"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"PK\x03\x04\x14\x00", "ZIP"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b'\xef\xbb\xbf  <?xml version="1.0"?>\n<svg width="1"/>', "SVG"),
        (b"<!DOCTYPE svg PUBLIC", "SVG"),
        (b'<?xml version="1.0"?><rss/>', "XML"),
        (b"\n\n  <!doctype HTML><title>x</title>", "HTML"),
        (b"\xef\xbb\xbf<html lang=en>", "HTML"),
        ("\ufeff<html>".encode("utf-16-le"), "HTML"),
        (b"<!-- a comment -->", "HTML"),
        (b"<p>hello", "HTML"),
        (b'{"error": "not found"}', "JSON"),
        (b"  [\n  1, 2]", "JSON"),
        (b"Access denied\r\n", "plain text"),
        ("Zugriff verweigert für Bilder".encode()[:23], "plain text"),  # cut inside "ü"
        (b"", None),
        (b"\x13\x37" * 10, None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"BMW\x00\x01", None),  # BM without the zero reserved bytes is no bitmap
    ],
)
def test_sniffer_names_what_the_bytes_are(head: bytes, name: str | None) -> None:
    """Every format of the tables, text after whitespace or a byte order mark, and None."""
    assert sniff_format(head) == name


def test_sniffer_names_and_nouns_are_consistent() -> None:
    """Allowed formats are pictures; every name has a noun for messages."""
    assert {"JPEG", "PNG", "WebP"} == ALLOWED_NAMES
    assert ALLOWED_NAMES < PICTURE_NAMES
    assert {"GIF", "HEIC", "AVIF", "SVG"} <= PICTURE_NAMES
    assert not {"HTML", "PDF", "JSON", "ZIP", "gzip", "MP4", "plain text"} & PICTURE_NAMES
    assert format_noun("GIF") == "a GIF image"
    assert format_noun("HTML") == "an HTML page"
    assert format_noun("plain text") == "plain text"


def test_sniffer_reads_only_its_head() -> None:
    """Only the first SNIFF_BYTES count: whitespace that long hides the tag after it."""
    assert sniff_format(b" " * (SNIFF_BYTES - 6) + b"<html>") == "HTML"
    assert sniff_format(b" " * SNIFF_BYTES + b"<html>") == "plain text"


NOT_AN_IMAGE = "not an image; send a JPEG, PNG or WebP file"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<!doctype html><p>404</p>", f"image data is an HTML page, {NOT_AN_IMAGE}"),
        (b"%PDF-1.4\n" + b"\0" * 64, f"image data is a PDF document, {NOT_AN_IMAGE}"),
        (b'{"url": "https://example.com/cat.jpg"}', f"image data is JSON, {NOT_AN_IMAGE}"),
        (b"\x1f\x8b\x08" + b"\0" * 64, f"image data is gzip-compressed data, {NOT_AN_IMAGE}"),
        (FTYP + b"heic" + b"\0" * 64, "image format HEIC is not supported; send JPEG, PNG or WebP"),
        (FTYP + b"avif" + b"\0" * 64, "image format AVIF is not supported; send JPEG, PNG or WebP"),
    ],
)
def test_refusals_name_what_the_bytes_are(data: bytes, message: str) -> None:
    """Documents, archives and other picture formats are refused with their name."""
    with pytest.raises(ImageInvalid) as caught:
        prepare_image(data, 832, 480)
    assert caught.value.code == "image_invalid"
    assert str(caught.value) == message


# -- one decode's memory: strips, and the same pixels as the whole-frame way -------------


def _whole_frame(data: bytes, width: int, height: int) -> np.ndarray:
    """The straightforward way: the whole frame to RGB over white, then one Pillow resize of
    the centred cover box (Pillow shrinking by whole factors first, as prepare_image asks)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I"):
            grey = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
            flat = Image.fromarray(grey).convert("RGB")
        else:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, BACKGROUND)
            flat.paste(rgba, mask=rgba.getchannel("A"))
    w, h = flat.size
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    box = (left, top, left + box_w, top + box_h)
    resample = Image.Resampling.LANCZOS
    return np.asarray(flat.resize((width, height), resample, box=box, reducing_gap=3.0))


def _noise(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    if mode == "P":
        return rgba.convert("RGB").convert("P")
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "I;16", "L", "RGB"])
@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((900, 700), (832, 480)),  # rows first, no whole-factor shrink
        ((700, 1200), (832, 480)),  # columns first (the height shrinks much more)
        ((1500, 1000), (160, 90)),  # shrunk by a whole factor first
        ((200, 150), (832, 480)),  # enlarged
    ],
)
def test_strips_give_the_pixels_of_the_whole_frame(
    monkeypatch: pytest.MonkeyPatch, mode: str, source: tuple[int, int], target: tuple[int, int]
) -> None:
    """Converting a few rows or columns at a time (here: strips of a few thousand pixels)
    gives exactly what converting the whole frame and resizing it once would."""
    monkeypatch.setattr(images, "_STRIP_PIXELS", 5000)
    image = _noise(mode, source)
    data = _encode(image, "PNG", transparency=7) if mode == "P" else _encode(image, "PNG")
    limits = ImageLimits(max_bytes=64 * 1024 * 1024)
    out = np.asarray(prepare_image(data, *target, limits=limits))
    assert np.array_equal(out, _whole_frame(data, *target))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_of_png_and_webp_is_applied(fmt: str) -> None:
    """Orientation 6 in a PNG eXIf chunk or a WebP EXIF chunk turns the output upright too."""
    stored = Image.new("RGBA", (128, 64), (*GREY, 255))
    stored.paste((*RED, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare_image(_encode(stored, fmt, exif=exif, lossless=True), 64, 128)
    assert out.size == (64, 128)
    assert _near(out.getpixel((48, 16)), RED)
    assert _near(out.getpixel((16, 16)), GREY)


def test_concurrent_decodes_each_get_their_own_picture() -> None:
    """Decodes from several threads (the lanes of a node) take turns and all succeed."""
    from concurrent.futures import ThreadPoolExecutor

    colours = [RED, BLUE, GREY, (0, 255, 0)]
    files = [_encode(Image.new("RGB", (640, 480), c), "PNG") for c in colours]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda d: prepare_image(d, 320, 240), files * 3))
    assert [o.getpixel((160, 120)) for o in outs] == colours * 3


def test_webp_and_progressive_jpeg_are_held_to_the_decode_budget() -> None:
    """The header's decode cost is checked: a WebP costs four frames, a progressive JPEG
    all its DCT coefficients; the same picture as PNG or baseline JPEG fits the budget."""
    picture = Image.new("RGB", (200, 200), RED)
    limits = ImageLimits(max_decode_bytes=500_000)
    with pytest.raises(ImageInvalid) as caught:
        prepare_image(_encode(picture, "WEBP"), 64, 64, limits=limits)
    assert str(caught.value) == (
        "image is a 200x200 pixel WebP (0.0 MP), which takes 0.6 MiB to decode; "
        "the limit is 0.5 MiB; send a smaller image or a PNG or JPEG"
    )
    assert prepare_image(_encode(picture, "PNG"), 64, 64, limits=limits).size == (64, 64)
    progressive = _encode(Image.new("RGB", (400, 400), RED), "JPEG", progressive=True)
    limits = ImageLimits(max_decode_bytes=400_000)  # 4:2:0 coefficients: 480,000 bytes
    with pytest.raises(ImageInvalid, match=r"400x400 pixel progressive JPEG .* baseline JPEG"):
        prepare_image(progressive, 64, 64, limits=limits)
    baseline = _encode(Image.new("RGB", (400, 400), RED), "JPEG")
    assert prepare_image(baseline, 64, 64, limits=limits).size == (64, 64)


def test_the_default_budget_admits_a_64_mp_png() -> None:
    """Every PNG within max_pixels fits max_decode_bytes: the budget only bites on the
    formats that cost more than their frame."""
    with Image.open(io.BytesIO(_png_claiming(8000, 8000))) as image:
        assert images._decode_bytes(image) == 8000 * 8000 * 4 <= ImageLimits().max_decode_bytes


@pytest.mark.skipif(images._TRIM is None, reason="glibc only")
def test_a_large_frame_is_given_back_to_the_system() -> None:
    """After a 20 MP decode in a pool thread (as the node runs it) the process holds no
    more than before: the freed frame does not stay in that thread's heap."""
    from concurrent.futures import ThreadPoolExecutor

    data = _encode(Image.new("RGBA", (5000, 4000), (*RED, 128)), "PNG")  # an 80 MB frame
    assert images._TRIM is not None
    images._TRIM(0)
    with ThreadPoolExecutor(1) as pool:
        before = _rss_mib()
        pool.submit(prepare_image, data, 832, 480).result()
        assert _rss_mib() - before < 20


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024
