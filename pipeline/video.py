"""Frames to an H.264 MP4 and a JPEG poster, and a probe that reads an MP4 back.

Owns codec choice, colour tagging and the container layout (faststart). Must never run on an
event loop: every function here is blocking CPU work, so callers use a thread or process.

Errors: a bad `fps`, `crf` or `quality` is `InvalidRequest` (it comes from job or node
parameters). A bad frame array (dtype, shape, odd size, no frames) is `VideoEncodingError`:
the engine made those frames, so it is our fault, not the submitter's. So is any libav failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from .errors import InvalidRequest, VideoEncodingError

__all__ = [
    "H264_ENCODERS",
    "BackgroundMp4",
    "Mp4Stream",
    "VideoInfo",
    "encode_mp4",
    "probe_mp4",
    "write_poster",
]

H264_ENCODERS = ("libx264", "libopenh264")
"""Software H.264 encoders in order of preference; the first this PyAV build has is used."""

PIX_FMT = "yuv420p"
"""The one pixel format every browser and phone plays; it needs even width and height."""

_MAX_FPS = 240
_X264_PRESET = "medium"
# libopenh264 has no CRF; aim for a bit rate per pixel that looks like CRF ~18-20 to the eye.
_OPENH264_BITS_PER_PIXEL = 0.2

Destination = str | os.PathLike[str] | BinaryIO


@dataclass(frozen=True)
class VideoInfo:
    """What an MP4 holds: size, exact frame count and rate, codec and file size."""

    width: int
    height: int
    num_frames: int
    fps: Fraction
    codec: str
    pix_fmt: str
    duration_s: float
    size_bytes: int | None
    """None when the file size could not be learnt (an unseekable stream)."""


def encode_mp4(
    frames: NDArray[np.uint8], out: Destination, fps: int, *, crf: int = 18
) -> VideoInfo:
    """Encode uint8 RGB frames shaped (T, H, W, 3) as H.264 yuv420p MP4 at exactly `fps`.

    The MP4 is faststart (index first, so browsers play while downloading) and tagged BT.709,
    limited range. `crf` is libx264's quality (0-51, lower is better); libopenh264 ignores it.
    """
    _check_frames(frames, ndim=4, even=True)
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= _MAX_FPS:
        raise InvalidRequest(f"fps must be a whole number between 1 and {_MAX_FPS}; got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise InvalidRequest(f"crf must be a whole number between 0 and 51; got {crf!r}")
    encoder = _h264_encoder()
    num_frames, height, width = frames.shape[:3]
    if isinstance(out, (str, os.PathLike)):
        path = Path(out)
        _encode_file(frames, path, fps, crf, encoder)
        size = path.stat().st_size
    else:
        # faststart rewrites the file through its name after the last frame, which a
        # Python stream does not have, so encode to a private temp file and copy.
        with tempfile.TemporaryDirectory(prefix="i2v-mp4-") as tmp:
            path = Path(tmp) / "video.mp4"
            _encode_file(frames, path, fps, crf, encoder)
            size = path.stat().st_size
            try:
                with path.open("rb") as src:
                    shutil.copyfileobj(src, out)
            except OSError as exc:
                raise VideoEncodingError(f"could not write the MP4 to the stream: {exc}") from exc
    return VideoInfo(
        width=width,
        height=height,
        num_frames=num_frames,
        fps=Fraction(fps),
        codec="h264",
        pix_fmt=PIX_FMT,
        duration_s=num_frames / fps,
        size_bytes=size,
    )


def write_poster(frame: NDArray[np.uint8], out: Destination, quality: int = 90) -> None:
    """Write one uint8 RGB frame shaped (H, W, 3) as a JPEG (quality 1-95)."""
    _check_frames(frame, ndim=3, even=False)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise InvalidRequest(f"poster quality must be a whole number 1-95; got {quality!r}")
    try:
        Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality)
    except OSError as exc:
        raise VideoEncodingError(f"could not write the JPEG poster: {exc}") from exc


def probe_mp4(src: Destination) -> VideoInfo:
    """Read an MP4 back, counting frames by decoding them all (so it costs a full decode)."""
    size = _size_of(src)
    try:
        source = os.fspath(src) if isinstance(src, (str, os.PathLike)) else src
        with av.open(source, "r") as container:
            if not container.streams.video:
                raise VideoEncodingError("the MP4 has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoEncodingError("the MP4 video stream has no frame rate")
            num_frames = 0
            for _ in container.decode(stream):
                num_frames += 1
            ctx = stream.codec_context
            duration_s = (
                container.duration / av.time_base
                if container.duration is not None
                else num_frames / rate
            )
            return VideoInfo(
                width=ctx.width,
                height=ctx.height,
                num_frames=num_frames,
                fps=Fraction(rate),
                codec=ctx.name,
                pix_fmt=ctx.pix_fmt or "",
                duration_s=float(duration_s),
                size_bytes=size,
            )
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoEncodingError(f"could not read the MP4: {exc}") from exc


@cache
def _h264_encoder() -> str:
    for name in H264_ENCODERS:
        if name in av.codecs_available:
            return name
    raise VideoEncodingError(
        f"this PyAV build has no H.264 encoder (looked for {', '.join(H264_ENCODERS)}); "
        "install the PyPI 'av' wheel, which bundles libx264"
    )


def _encode_file(frames: NDArray[np.uint8], path: Path, fps: int, crf: int, encoder: str) -> None:
    stream = Mp4Stream(path, fps, crf=crf, encoder=encoder)
    try:
        stream.add(frames)
    except BaseException:
        stream.abort()
        raise
    stream.close()


class Mp4Stream:
    """An MP4 written as its frames arrive: `add` encodes each chunk (T, H, W, 3) in order,
    `close` finishes the file and says what it holds. The bytes are those of `encode_mp4`
    on all the frames at once (same encoder, same options, frame by frame either way).

    Blocking work: run it off the event loop; `BackgroundMp4` runs it beside the decoder.
    """

    def __init__(
        self, path: str | os.PathLike[str], fps: int, *, crf: int = 18, encoder: str | None = None
    ) -> None:
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= _MAX_FPS:
            raise InvalidRequest(
                f"fps must be a whole number between 1 and {_MAX_FPS}; got {fps!r}"
            )
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise InvalidRequest(f"crf must be a whole number between 0 and 51; got {crf!r}")
        self.path = Path(path)
        self.fps, self.crf = fps, crf
        self.encoder = encoder or _h264_encoder()
        self._out: Any = None
        self._stream: Any = None
        self._count = 0
        self._size: tuple[int, int] | None = None

    def add(self, frames: NDArray[np.uint8]) -> None:
        """Encode the next frames (T, H, W, 3), all the size of the first chunk."""
        _check_frames(frames, ndim=4, even=True)
        height, width = frames.shape[1:3]
        if self._size is None:
            self._open(width, height)
        elif self._size != (width, height):
            raise VideoEncodingError(
                f"every chunk must be {self._size[0]}x{self._size[1]}; got {width}x{height}"
            )
        try:
            for frame in frames:
                rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")
                yuv = rgb.reformat(format=PIX_FMT, dst_colorspace="ITU709", dst_color_range=1)
                yuv.pts = self._count
                self._out.mux(self._stream.encode(yuv))
                self._count += 1
        except (av.error.FFmpegError, OSError) as exc:
            self.abort()
            raise VideoEncodingError(f"H.264 encoding with {self.encoder} failed: {exc}") from exc

    def close(self) -> VideoInfo:
        """Flush the encoder, finish the file (faststart) and describe it."""
        if self._out is None or self._size is None:
            raise VideoEncodingError("there must be at least one frame to encode")
        try:
            self._out.mux(self._stream.encode(None))
            self._out.close()
        except (av.error.FFmpegError, OSError) as exc:
            self.abort()
            raise VideoEncodingError(f"H.264 encoding with {self.encoder} failed: {exc}") from exc
        self._out = None
        width, height = self._size
        return VideoInfo(
            width=width,
            height=height,
            num_frames=self._count,
            fps=Fraction(self.fps),
            codec="h264",
            pix_fmt=PIX_FMT,
            duration_s=self._count / self.fps,
            size_bytes=self.path.stat().st_size,
        )

    def abort(self) -> None:
        """Give up: close what is open and remove the partial file."""
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(Exception):
                out.close()
        self.path.unlink(missing_ok=True)

    def _open(self, width: int, height: int) -> None:
        if self.encoder == "libx264":
            options = {"crf": str(self.crf), "preset": _X264_PRESET}
            bit_rate = None
        else:
            options = {}
            bit_rate = int(width * height * self.fps * _OPENH264_BITS_PER_PIXEL)
        try:
            out = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
            stream = out.add_stream(self.encoder, rate=Fraction(self.fps), options=options)
            assert isinstance(stream, av.VideoStream)
            ctx = stream.codec_context
            ctx.width, ctx.height, ctx.pix_fmt = width, height, PIX_FMT
            # A 1/fps time base with pts = index gives exactly T frames at exactly fps.
            ctx.time_base = Fraction(1, self.fps)
            if bit_rate is not None:
                ctx.bit_rate = bit_rate
            # Convert with BT.709 ourselves and say so in the stream: untagged HD video
            # is guessed as BT.709 by players while swscale defaults to BT.601.
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # BT.709
            ctx.color_range = 1  # limited ("MPEG") range
        except (av.error.FFmpegError, OSError) as exc:
            self.path.unlink(missing_ok=True)
            raise VideoEncodingError(f"H.264 encoding with {self.encoder} failed: {exc}") from exc
        self._out, self._stream, self._size = out, stream, (width, height)


class BackgroundMp4:
    """An `Mp4Stream` fed from another thread: `submit` hands over a chunk and returns at
    once, so the decoder makes the next frames while these are encoded. `finish` waits for
    the last chunk and returns the file's `VideoInfo` (or raises the encoder's error)."""

    def __init__(self, path: str | os.PathLike[str], fps: int, *, crf: int = 18) -> None:
        self._mp4 = Mp4Stream(path, fps, crf=crf)
        self._chunks: queue.Queue[NDArray[np.uint8] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="i2v-mp4", daemon=True)
        self._thread.start()

    def submit(self, frames: NDArray[np.uint8]) -> None:
        self._chunks.put(frames)

    def finish(self) -> VideoInfo:
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._mp4.close()

    def abort(self) -> None:
        """Stop encoding and remove the partial file (a stopped or failed job)."""
        self._chunks.put(None)
        self._thread.join()
        self._mp4.abort()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._error is None:
                try:
                    self._mp4.add(chunk)
                except BaseException as exc:  # reported by finish()
                    self._error = exc


def _check_frames(frames: NDArray[np.uint8], *, ndim: int, even: bool) -> None:
    want = "(T, H, W, 3)" if ndim == 4 else "(H, W, 3)"
    if not isinstance(frames, np.ndarray):
        raise VideoEncodingError(f"frames must be a numpy array {want}; got {type(frames)}")
    if frames.dtype != np.uint8:
        raise VideoEncodingError(f"frames must be uint8; got {frames.dtype}")
    if frames.ndim != ndim or frames.shape[-1] != 3:
        raise VideoEncodingError(f"frames must be RGB shaped {want}; got {frames.shape}")
    if ndim == 4 and frames.shape[0] < 1:
        raise VideoEncodingError("there must be at least one frame to encode")
    height, width = frames.shape[-3:-1]
    if height < 1 or width < 1:
        raise VideoEncodingError(f"frames must not be empty; got {width}x{height}")
    if even and (height % 2 or width % 2):
        raise VideoEncodingError(
            f"frame size must be even on both sides for {PIX_FMT}; got {width}x{height}"
        )


def _size_of(src: Destination) -> int | None:
    if isinstance(src, (str, os.PathLike)):
        try:
            return os.stat(src).st_size
        except OSError:
            return None  # av.open below reports the missing file with a clearer message
    try:
        here = src.tell()
        end = src.seek(0, os.SEEK_END)
        src.seek(here)
    except (OSError, AttributeError, ValueError):
        return None
    return end - here
