"""File formats named from their first bytes, so a refusal can say what was actually sent.

Owns the signature tables and the one sniffer both the image fetcher (`consumer.fetch`) and
the decoder (`pipeline.images`) use. Pure bytes: imports neither Pillow nor torch, so the
fetcher can use it without loading an image library. Naming is for messages and for the
fetcher's early refusal; what gets decoded is still decided by Pillow's own detection,
restricted to the allow-list.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALLOWED_NAMES",
    "PICTURE_NAMES",
    "SNIFF_BYTES",
    "format_noun",
    "sniff_format",
]

SNIFF_BYTES = 256
"""How much of the start `sniff_format` reads. Binary formats need at most 16 bytes; the
rest lets text formats be told apart after leading whitespace (an SVG after `<?xml ...?>`)."""


@dataclass(frozen=True)
class _Signature:
    name: str
    noun: str
    marks: tuple[tuple[int, bytes], ...]
    """(offset, bytes) pairs that must all be present."""

    def matches(self, head: bytes) -> bool:
        return all(head[at : at + len(mark)] == mark for at, mark in self.marks)


def _at0(name: str, noun: str, *prefixes: bytes) -> tuple[_Signature, ...]:
    return tuple(_Signature(name, noun, ((0, p),)) for p in prefixes)


def _brands(name: str, noun: str, *brands: bytes) -> tuple[_Signature, ...]:
    # ISO base media files (HEIF, AVIF, MP4): an `ftyp` box first, its major brand after it.
    return tuple(_Signature(name, noun, ((4, b"ftyp" + b),)) for b in brands)


_ALLOWED_SIGNATURES: tuple[_Signature, ...] = (
    *_at0("JPEG", "a JPEG image", b"\xff\xd8\xff"),
    *_at0("PNG", "a PNG image", b"\x89PNG\r\n\x1a\n"),
    _Signature("WebP", "a WebP image", ((0, b"RIFF"), (8, b"WEBP"))),
)
# First match wins: the image brands of `ftyp` come before the generic MP4 entry.
_REFUSED_SIGNATURES: tuple[_Signature, ...] = (
    *_at0("GIF", "a GIF image", b"GIF87a", b"GIF89a"),
    # "BM" alone would name any text starting with those letters; the reserved bytes are 0.
    _Signature("BMP", "a BMP image", ((0, b"BM"), (6, b"\x00\x00\x00\x00"))),
    *_at0("TIFF", "a TIFF image", b"II*\x00", b"MM\x00*"),
    *_at0("PDF", "a PDF document", b"%PDF-"),
    *_at0("ICO", "an ICO image", b"\x00\x00\x01\x00"),
    *_at0("PSD", "a PSD (Photoshop) image", b"8BPS"),
    *_at0("JPEG XL", "a JPEG XL image", b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"),
    *_at0("JPEG 2000", "a JPEG 2000 image", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"),
    *_brands("HEIC", "a HEIC image", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"),
    *_brands("HEIF", "a HEIF image", b"mif1", b"msf1"),
    *_brands("AVIF", "an AVIF image", b"avif", b"avis"),
    _Signature("MP4", "an MP4 video", ((4, b"ftyp"),)),
    *_at0("gzip", "gzip-compressed data", b"\x1f\x8b"),
    *_at0("ZIP", "a ZIP archive", b"PK\x03\x04", b"PK\x05\x06"),
)
_TEXT_NOUNS = {
    "SVG": "an SVG image",
    "HTML": "an HTML page",
    "XML": "an XML document",
    "JSON": "JSON",
    "plain text": "plain text",
}
_NOUNS = {s.name: s.noun for s in _ALLOWED_SIGNATURES + _REFUSED_SIGNATURES} | _TEXT_NOUNS

ALLOWED_NAMES = frozenset(s.name for s in _ALLOWED_SIGNATURES)
"""What `sniff_format` calls the formats we decode: JPEG, PNG and WebP."""
# A picture format is one whose noun ends in "image".
PICTURE_NAMES = frozenset(n for n, noun in _NOUNS.items() if noun.endswith(" image"))
"""Names of picture formats (GIF, HEIC, SVG...), as opposed to documents, archives or text."""

_SPACE = " \t\r\n\f"
_TAG_END = frozenset(" \t\r\n\f>/")
# The HTML openers of the WHATWG MIME sniffing standard, lower case, without the `<`.
_HTML_TAGS = (
    "!doctype html", "html", "head", "script", "iframe", "h1", "div", "font", "table", "a",
    "style", "title", "b", "body", "br", "p", "!--",
)  # fmt: skip
_JSON_AFTER_BRACKET = frozenset('{["-0123456789tfn]')


def sniff_format(head: bytes) -> str | None:
    """The name of the format `head`, a file's first bytes, starts like; None if unknown.

    Names are "JPEG", "PNG", "WebP" (see `ALLOWED_NAMES`), "GIF", "BMP", "TIFF", "PDF",
    "ICO", "PSD", "JPEG XL", "JPEG 2000", "HEIC", "HEIF", "AVIF", "MP4", "gzip", "ZIP",
    "SVG", "HTML", "XML", "JSON" and "plain text". Empty input is None. Only the first
    `SNIFF_BYTES` are read; a named format may still be truncated or corrupt.
    """
    head = head[:SNIFF_BYTES]
    for signature in _ALLOWED_SIGNATURES + _REFUSED_SIGNATURES:
        if signature.matches(head):
            return signature.name
    return _text_format(head)


def format_noun(name: str) -> str:
    """`name` from `sniff_format` as a phrase for messages: "a GIF image", "an HTML page"."""
    return _NOUNS.get(name, name)


def _text_format(head: bytes) -> str | None:
    text = _as_text(head)
    if text is None:
        return None
    start = text.lstrip(_SPACE)
    lower = start.lower()
    if _opens(lower, "svg") or lower.startswith("<!doctype svg"):
        return "SVG"
    if lower.startswith("<?xml"):
        return "SVG" if "<svg" in lower else "XML"
    if any(_opens(lower, tag) for tag in _HTML_TAGS):
        return "HTML"
    if lower.startswith("<!doctype"):
        return "XML"
    after = start[1:].lstrip(_SPACE)[:1]
    if start[:1] == "{" and after in ("", '"', "}"):
        return "JSON"
    if start[:1] == "[" and (not after or after in _JSON_AFTER_BRACKET):
        return "JSON"
    readable = all(c.isprintable() or c in _SPACE for c in text)
    return "plain text" if text and readable else None


def _opens(lower: str, tag: str) -> bool:
    """Whether `lower` starts with the tag `<tag`, followed by a tag-ending character or the end."""
    if not lower.startswith("<" + tag):
        return False
    rest = lower[len(tag) + 1 :]
    return not rest or tag == "!--" or rest[0] in _TAG_END


def _as_text(head: bytes) -> str | None:
    """`head` decoded as UTF-8, or as UTF-16 after its byte order mark; None if not text."""
    codec = "utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return head.decode(codec)
    except UnicodeDecodeError as exc:
        if exc.end < len(head) or exc.reason not in ("unexpected end of data", "truncated data"):
            return None
        return head[: exc.start].decode(codec)  # the head cut a character in two
