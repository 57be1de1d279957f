"""Peak memory and time of one input-image decode, the old whole-frame path against today's.

Run: `.venv/bin/python benchmarks/image_memory.py [--size 1280x720] [--repeats 3] [--out FILE]`.
Builds each input once (64 MP PNG RGB, RGBA, palette and 16-bit grey, 64 MP baseline and
progressive JPEG (4:2:0 and 4:4:4), a 24 MP camera JPEG turned by EXIF, a 64 MP and a 16 MP
WebP and a 1280x720 JPEG),
then decodes it to the target size in a fresh subprocess per case and path, so each peak
is that decode's alone: peak RSS (VmHWM, reset through /proc/self/clear_refs just before
the call) minus RSS right before it, with the file's bytes, Pillow, numpy and a warm-up
decode of the same format already in memory. `old` is `baseline` below, a copy of
prepare_image as it was before the strip-wise path; `new` is pipeline.images.prepare_image.
Times are the best of --repeats calls in the same subprocess, after the measured one;
`refused` marks an input the new path turns down from its header (`max_decode_bytes`).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MiB = 1024 * 1024
SIDE = 8000  # 8000 x 8000 = 64 MP, exactly the default max_pixels


# -- the old path, as prepare_image was: a full-size copy at every step ----------------


def baseline(data: bytes, width: int, height: int) -> Image.Image:
    """prepare_image before the strip-wise path (limits and error mapping left out)."""
    with Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "WEBP")) as image:
        orientation = image.getexif().get(0x0112)
        if image.format == "JPEG":
            need = (height, width) if orientation in {5, 6, 7, 8} else (width, height)
            image.draft(None, need)
        image.load()
        upright = ImageOps.exif_transpose(image)
    return _old_cover(_old_to_rgb(upright), width, height)


def _old_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith("I"):
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _old_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    w, h = image.size
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return image.resize(
        (width, height),
        Image.Resampling.LANCZOS,
        box=(left, top, left + box_w, top + box_h),
        reducing_gap=3.0,
    )


# -- the inputs -----------------------------------------------------------------------


def _photo(w: int, h: int, noise: int) -> np.ndarray:
    """Smooth gradients with a few hard-edged blocks: compresses like a photo or a render,
    so a 64 MP PNG stays under the 20 MiB file limit. `noise` adds sensor-like grain."""
    y, x = np.ogrid[0:h, 0:w]
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    rgb[..., 0] = (x * 255 // w).astype(np.uint8)
    rgb[..., 1] = (y * 255 // h).astype(np.uint8)
    rgb[..., 2] = ((x + y) * 255 // (w + h)).astype(np.uint8)
    for i in range(8):
        rgb[h * i // 8 : h * i // 8 + h // 20, w // 10 : w // 3] = (30 * i, 200, 90)
    if noise:
        grain = np.random.default_rng(0).integers(-noise, noise + 1, (h, w, 1), dtype=np.int16)
        rgb = np.clip(rgb + grain, 0, 255).astype(np.uint8)
    return rgb


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _rgba(w: int, h: int) -> Image.Image:
    image = Image.fromarray(_photo(w, h, 0))
    y, x = np.ogrid[0:h, 0:w]
    image.putalpha(Image.fromarray(((x + y) * 255 // (w + h)).astype(np.uint8)))
    return image


def _turned_jpeg(w: int, h: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(_photo(w, h, 6)), "JPEG", quality=92, exif=exif)


def _grey16(w: int, h: int) -> Image.Image:
    return Image.fromarray(_photo(w, h, 0)[..., 0].astype(np.uint16) * 257)


CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "PNG 64 MP RGB": ("PNG", lambda: _encode(Image.fromarray(_photo(SIDE, SIDE, 0)), "PNG")),
    "PNG 64 MP RGBA": ("PNG", lambda: _encode(_rgba(SIDE, SIDE), "PNG")),
    "PNG 64 MP palette": (
        "PNG",
        lambda: _encode(Image.fromarray(_photo(SIDE, SIDE, 0)).quantize(64), "PNG"),
    ),
    "PNG 64 MP 16-bit grey": ("PNG", lambda: _encode(_grey16(SIDE, SIDE), "PNG")),
    "JPEG 64 MP": ("JPEG", lambda: _encode(Image.fromarray(_photo(SIDE, SIDE, 4)), "JPEG")),
    "JPEG 64 MP progressive": (
        "JPEG",
        lambda: _encode(Image.fromarray(_photo(SIDE, SIDE, 4)), "JPEG", progressive=True),
    ),
    "JPEG 64 MP progressive 4:4:4": (
        "JPEG",
        lambda: _encode(
            Image.fromarray(_photo(SIDE, SIDE, 4)), "JPEG", progressive=True, subsampling=0
        ),
    ),
    "JPEG 24 MP camera, EXIF 6": ("JPEG", lambda: _turned_jpeg(6000, 4000)),
    "WebP 64 MP": ("WEBP", lambda: _encode(Image.fromarray(_photo(SIDE, SIDE, 0)), "WEBP")),
    "WebP 16 MP": ("WEBP", lambda: _encode(Image.fromarray(_photo(4000, 4000, 0)), "WEBP")),
    "JPEG 1280x720": ("JPEG", lambda: _encode(Image.fromarray(_photo(1280, 720, 4)), "JPEG")),
}


# -- one measurement, in its own process ------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: Path, fmt: str, which: str, size: tuple[int, int], repeats: int) -> None:
    from i2v_fleet.pipeline.errors import ImageInvalid
    from i2v_fleet.pipeline.images import prepare_image

    decode = baseline if which == "old" else prepare_image
    warm = _encode(Image.fromarray(_photo(256, 256, 4)), fmt)
    decode(warm, 64, 64)  # plugin modules and codec libraries load here, not below
    data = path.read_bytes()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    try:
        out = decode(data, *size)
    except ImageInvalid:
        peak = _status_kib("VmHWM")
        print(f"{(peak - before) / 1024} -1")  # refused (from the header)
        return
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    assert (out.size, out.mode) == (size, "RGB")
    del out
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        decode(data, *size)
        seconds = min(seconds, time.perf_counter() - t0)
    print(f"{(peak - before) / 1024} {seconds}")  # one line back to the parent


def measure(path: Path, fmt: str, which: str, size: str, repeats: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(path), "--format", fmt]
    command += ["--which", which, "--size", size, "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    peak_mib, seconds = (float(v) for v in done.stdout.split())
    return {"peak_mib": peak_mib, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1280x720", help="target WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--which", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    w, h = (int(n) for n in args.size.split("x"))
    if args.child:
        child(args.child, args.format, args.which, (w, h), args.repeats)
        return
    header = (
        f"{'case':<30} {'file MiB':>8} {'old MiB':>8} {'new MiB':>8} {'old/new':>7} "
        f"{'old s':>6} {'new s':>6}"
    )
    lines = [
        f"# one decode to {w}x{h}: peak RSS over the process before it (MiB), best time (s)",
        header,
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fmt, build) in CASES.items():
            path = Path(tmp) / "input"
            path.write_bytes(build())
            old = measure(path, fmt, "old", args.size, args.repeats)
            new = measure(path, fmt, "new", args.size, args.repeats)
            refused = new["seconds"] < 0
            ratio = "-" if refused else f"{old['peak_mib'] / max(new['peak_mib'], 0.1):.1f}"
            line = (
                f"{name:<30} {path.stat().st_size / MiB:8.1f} {old['peak_mib']:8.1f} "
                f"{new['peak_mib']:8.1f} {ratio:>7} {old['seconds']:6.2f} "
                + (f"{'refused':>7}" if refused else f"{new['seconds']:6.2f}")
            )
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
