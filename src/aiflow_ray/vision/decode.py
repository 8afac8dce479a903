"""Safe decoding of client images on the device tier, before anything crosses the network.

This module owns the trust boundary for image bytes: it turns an image URL from a request into bytes (or a
reference to a remote image the caller may fetch), checks size, format and pixel count from the header before
any pixel is decoded, decodes the first frame into an oriented RGB image, and removes metadata (EXIF with GPS,
XMP, comments, text chunks) from the client's encoded bytes losslessly, so what is forwarded to the edge or the
cloud carries the pixels and nothing else. Every refusal is an ``ImageInputError`` with an HTTP status and a
one-sentence message that names the offending field.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "ImageInputError",
    "ImageLimits",
    "RemoteImageRef",
    "check_image_count",
    "decode_image",
    "encode_jpeg",
    "encode_png",
    "parse_image_url",
    "sniff_format",
    "strip_metadata",
]

# Pillow format names that a deployment may allow; TIFF is sniffed only so that it can be refused by name.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_DISPLAY_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF"}
MAX_ASPECT_RATIO = 200

# Corrupt input reaches Pillow's plugins, which signal it with any of these; each becomes a 400, never a 500.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)


class ImageLimits(BaseModel):
    """What a deployment accepts from clients as images."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(
        12 * 1024 * 1024,
        ge=1,
        description="Largest encoded image accepted, bytes (after base64 decoding); camera photos are up to ~10 MB.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest width x height accepted, pixels, checked from the header before decoding. Pillow's "
        "own decompression-bomb guard (about 89 million pixels) caps it regardless.",
    )
    max_images: int = Field(4, ge=0, description="Most images in one request.")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP"),
        min_length=1,
        description="Pillow format names accepted, decided by the bytes' magic numbers, not the declared MIME type; "
        f"any of {', '.join(SUPPORTED_FORMATS)}.",
    )
    allow_remote_urls: bool = Field(
        False, description="Accept http(s) image URLs (fetched by the caller); off means data URLs only."
    )
    url_allow_list: tuple[str, ...] = Field(
        (), description="Host names whose http(s) image URLs are accepted when allow_remote_urls is on."
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.upper() for name in value))
        unknown = [name for name in names if name not in SUPPORTED_FORMATS]
        if unknown:
            raise ValueError(f"unsupported image formats {unknown}; choose from {', '.join(SUPPORTED_FORMATS)}")
        return names

    @field_validator("url_allow_list")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = tuple(host.strip().lower().rstrip(".") for host in value)
        bad = [host for host in hosts if not host or any(c in host for c in "/:@ \\?#")]
        if bad:
            raise ValueError(f"url_allow_list takes bare host names, not {bad}")
        return hosts


class ImageInputError(ValueError):
    """A client image refused: ``status`` is the HTTP status, the message names ``field`` in one sentence."""

    def __init__(self, field: str, status: int, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions between processes; the default would call __init__ with the message alone.
        return (type(self), (self.field, self.status, str(self)))


@dataclass(frozen=True)
class RemoteImageRef:
    """An http(s) image URL on an allowed host; fetching it (with its own limits) is the caller's job."""

    url: str
    host: str


@dataclass(frozen=True)
class DecodedImage:
    """A client image after every check: oriented RGB pixels and the metadata-free encoded bytes."""

    pixels: Image.Image  # mode RGB, EXIF orientation applied, no info (so nothing leaks into a later save)
    format: str  # Pillow format name decided by the magic bytes
    width: int  # after orientation
    height: int
    raw_bytes: int  # encoded size the client sent
    clean: bytes  # the client's encoding, metadata removed losslessly (not re-oriented: see orientation)
    orientation: int  # EXIF orientation 1..8 applied to pixels; clean still needs it, since its EXIF is gone


def _formats_list(formats: tuple[str, ...], conjunction: str) -> str:
    names = [_DISPLAY_NAMES.get(name, name) for name in formats]
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def _quoted(text: str, limit: int = 80) -> str:
    """Client text echoed in a message, shortened so a hostile value cannot flood logs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_image_count(count: int, field: str, limits: ImageLimits) -> None:
    """Refuse a request with more images than ``limits.max_images`` (400)."""
    if count > limits.max_images:
        raise ImageInputError(
            field, 400, f"{field} has {count} images; at most {limits.max_images} are allowed per request"
        )


# --------------------------------------------------------------------------------------------------- URLs

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
_DATA_URL_HEADER = re.compile(r"data:image/[A-Za-z0-9][A-Za-z0-9.+-]{0,40};base64,", re.IGNORECASE)
# Printable ASCII without space or backslash: URL parsers disagree about the rest (urlsplit silently drops tabs
# and newlines), and a host check is only sound when the fetcher parses the URL the same way.
_SAFE_REMOTE_URL = re.compile(r"[!-\[\]-~]{1,4096}")


def parse_image_url(url: str, field: str, limits: ImageLimits) -> bytes | RemoteImageRef:
    """The bytes of a ``data:image/<fmt>;base64,`` URL, or a ``RemoteImageRef`` for an allowed http(s) URL.

    The declared MIME subtype is not trusted (``decode_image`` sniffs the bytes). The encoded length is checked
    before decoding, so an oversized string costs nothing.
    """
    scheme_match = _SCHEME.match(url)
    if scheme_match is None:
        raise ImageInputError(field, 400, f"{field} is not a URL; send data:image/<format>;base64,<data>")
    scheme = scheme_match.group(1).lower()
    if scheme == "data":
        return _parse_data_url(url, field, limits)
    if scheme in ("http", "https"):
        return _parse_remote_url(url, field, limits)
    raise ImageInputError(
        field, 400, f"{field} uses the URL scheme {_quoted(scheme)}, which is not supported; send a data URL"
    )


def _parse_data_url(url: str, field: str, limits: ImageLimits) -> bytes:
    header = _DATA_URL_HEADER.match(url)
    if header is None:
        raise ImageInputError(
            field, 400, f"{field} is not a valid image data URL; expected data:image/<format>;base64,<data>"
        )
    encoded_chars = len(url) - header.end()
    if encoded_chars > limits.max_image_bytes * 4 // 3 + 4:
        raise ImageInputError(
            field,
            413,
            f"{field} is about {encoded_chars * 3 // 4:,} bytes; at most {limits.max_image_bytes:,} are allowed",
        )
    if encoded_chars == 0:
        raise ImageInputError(field, 400, f"{field} is an empty data URL")
    try:
        data = binascii.a2b_base64(url[header.end() :], strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(
            field, 400, f"{field} has invalid base64 data (standard alphabet, padded, no whitespace)"
        ) from exc
    if len(data) > limits.max_image_bytes:
        raise ImageInputError(
            field, 413, f"{field} is {len(data):,} bytes; at most {limits.max_image_bytes:,} are allowed"
        )
    return data


def _parse_remote_url(url: str, field: str, limits: ImageLimits) -> RemoteImageRef:
    if not limits.allow_remote_urls:
        raise ImageInputError(
            field,
            400,
            f"{field} is a remote URL, but remote image URLs are disabled on this deployment; "
            "send the image as a data URL (data:image/<format>;base64,<data>)",
        )
    if _SAFE_REMOTE_URL.fullmatch(url) is None:
        raise ImageInputError(
            field, 400, f"{field} is not a well-formed http(s) URL (at most 4096 printable ASCII characters)"
        )
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError as exc:
        raise ImageInputError(field, 400, f"{field} is not a well-formed http(s) URL") from exc
    if not host:
        raise ImageInputError(field, 400, f"{field} is an http(s) URL without a host")
    if has_credentials:
        raise ImageInputError(field, 400, f"{field} is an http(s) URL with credentials, which are not accepted")
    if host not in limits.url_allow_list:
        raise ImageInputError(
            field, 400, f"{field} points to the host {_quoted(host)}, which is not allowed for image URLs"
        )
    return RemoteImageRef(url=url, host=host)


# ------------------------------------------------------------------------------------------------ formats


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name the magic bytes announce, or None; the bytes decide, never a declared MIME type."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


# ------------------------------------------------------------------------------------------------ decoding

# The same table as ImageOps.exif_transpose.
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(data: bytes, field: str, limits: ImageLimits) -> DecodedImage:
    """Check and decode one client image (first frame only) into oriented RGB pixels plus metadata-free bytes.

    Every cheap check runs before a pixel is decoded: byte size (413), magic bytes against the allowed formats
    (415), then the header's dimensions against ``max_image_pixels`` (413), zero sizes and aspect ratios over
    200:1 (400). Corrupt or truncated data is a 400.
    """
    raw_bytes = len(data)
    if raw_bytes == 0:
        raise ImageInputError(field, 400, f"{field} is empty")
    if raw_bytes > limits.max_image_bytes:
        raise ImageInputError(
            field, 413, f"{field} is {raw_bytes:,} bytes; at most {limits.max_image_bytes:,} are allowed"
        )
    allowed = _formats_list(limits.formats, "or")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageInputError(field, 400, f"{field} is not a decodable {allowed} image")
    if fmt not in limits.formats:
        raise ImageInputError(
            field,
            415,
            f"{field} is a {_DISPLAY_NAMES[fmt]} image; only {_formats_list(limits.formats, 'and')} images are allowed",
        )
    corrupt = f"{field} is not a decodable {allowed} image: its {_DISPLAY_NAMES[fmt]} data is corrupt or truncated"
    bomb = (
        f"{field} has more than {Image.MAX_IMAGE_PIXELS or 0:,} pixels; at most {limits.max_image_pixels:,} are allowed"
    )

    try:
        # Pillow signals a likely bomb between its two thresholds with a warning only; make it a refusal.
        # catch_warnings is process-wide, so another thread may see the filter briefly: harmless, and the
        # header check below is the real guard in any case.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(field, 413, bomb) from exc
    except _DECODE_ERRORS as exc:
        raise ImageInputError(field, 400, corrupt) from exc

    try:
        width, height = image.size
        _check_dimensions(width, height, field, limits)
        try:
            image.load()  # the first frame only: animated GIF/WebP frames after it are never decoded
            orientation = _exif_orientation(image)
            oriented = image.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation]) if orientation != 1 else image
            pixels = _to_rgb(oriented)
        except Image.DecompressionBombError as exc:
            raise ImageInputError(field, 413, bomb) from exc
        except _DECODE_ERRORS as exc:
            raise ImageInputError(field, 400, corrupt) from exc
    finally:
        image.close()

    clean = strip_metadata(data, fmt, field=field)
    return DecodedImage(
        pixels=pixels,
        format=fmt,
        width=pixels.width,
        height=pixels.height,
        raw_bytes=raw_bytes,
        clean=clean,
        orientation=orientation,
    )


def _check_dimensions(width: int, height: int, field: str, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(field, 400, f"{field} has a zero width or height ({width}x{height})")
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise ImageInputError(
            field,
            413,
            f"{field} is {pixels:,} pixels ({width}x{height}); at most {limits.max_image_pixels:,} are allowed",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageInputError(
            field,
            400,
            f"{field} is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1, which is not accepted",
        )


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation the way ImageOps.exif_transpose reads it; 1 when absent or unreadable.

    Transposing here instead of calling exif_transpose keeps a broken EXIF block (common from phones and
    editors) from refusing the image: exif_transpose re-serialises the EXIF it edits and can fail on it, and
    the metadata is dropped anyway.
    """
    try:
        value = image.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE_FOR_ORIENTATION else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image with no info: alpha composited on white, 16-bit grey scaled (Pillow's convert clips it)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        grey = Image.fromarray((values >> 8).astype(np.uint8))
        out = grey.convert("RGB")
    elif mode in _ALPHA_MODES or (mode in ("P", "1", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
    else:
        out = image.convert("RGB")  # a copy even when already RGB: the result must not share the file's image
    out.info = {}
    return out


# ----------------------------------------------------------------------------------------- metadata removal


def strip_metadata(data: bytes, fmt: str, field: str = "image") -> bytes:
    """``data`` with its metadata removed, losslessly: segments and chunks are dropped, pixels never re-encoded.

    JPEG keeps JFIF APP0 (without its thumbnail), APP2 ICC_PROFILE and APP14 Adobe and ends at EOI; PNG keeps the
    chunks that define pixels and colour (CRCs verified, copied as they are) and ends at IEND; WebP drops EXIF,
    XMP and unknown chunks, clears the VP8X flags for them and rewrites the RIFF size; GIF drops comments and
    application extensions other than the loop count; BMP has no metadata blocks. Malformed structure is a 400.
    """
    name = fmt.upper()
    if sniff_format(data) != name:
        raise ImageInputError(field, 400, f"{field} is not a {_DISPLAY_NAMES.get(name, _quoted(fmt))} file")
    if name == "JPEG":
        return _strip_jpeg(data, field)
    if name == "PNG":
        return _strip_png(data, field)
    if name == "WEBP":
        return _strip_webp(data, field)
    if name == "GIF":
        return _strip_gif(data, field)
    if name == "BMP":
        return data
    raise ImageInputError(field, 415, f"{field} is a {_DISPLAY_NAMES.get(name, name)} image, which is not supported")


def _malformed(field: str, fmt: str, reason: str) -> ImageInputError:
    return ImageInputError(field, 400, f"{field} is not a well-formed {_DISPLAY_NAMES[fmt]} file: {reason}")


# In entropy-coded JPEG data 0xFF is followed by 0x00 (stuffing) or a restart marker; anything else but a fill
# byte (another 0xFF) ends the scan. A regex finds that in C instead of a Python loop over every byte.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JFIF_HEADER_BYTES = 14  # "JFIF\0", version, units, densities, thumbnail width and height


def _strip_jpeg(data: bytes, field: str) -> bytes:
    size = len(data)
    out = [b"\xff\xd8"]
    pos = 2
    seen_scan = False
    while True:
        if pos >= size or data[pos] != 0xFF:
            raise _malformed(field, "JPEG", "a marker is missing or it ends before its end-of-image marker")
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos >= size:
            raise _malformed(field, "JPEG", "it ends before its end-of-image marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            if not seen_scan:
                raise _malformed(field, "JPEG", "it has no image data")
            out.append(b"\xff\xd9")
            return b"".join(out)  # anything after EOI (motion-photo videos, MPO pictures) is dropped
        if marker in (0x00, 0xD8):
            raise _malformed(field, "JPEG", f"it has an unexpected marker 0xFF{marker:02X}")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers carry no length
            out.append(bytes((0xFF, marker)))
            continue
        if pos + 2 > size:
            raise _malformed(field, "JPEG", "it ends inside a segment header")
        length = int.from_bytes(data[pos : pos + 2], "big")
        end = pos + length
        if length < 2 or end > size:
            raise _malformed(field, "JPEG", f"the segment 0xFF{marker:02X} runs past the end of the data")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            kept = _kept_jpeg_segment(marker, data[pos + 2 : end])
            if kept is not None:
                out.append(kept)
        else:
            out.append(b"\xff" + bytes((marker,)) + data[pos:end])
        pos = end
        if marker == 0xDA:
            seen_scan = True
            scan_end = _JPEG_SCAN_END.search(data, pos)
            if scan_end is None:
                raise _malformed(field, "JPEG", "it ends before its end-of-image marker")
            out.append(data[pos : scan_end.start()])
            pos = scan_end.start()


def _kept_jpeg_segment(marker: int, payload: bytes) -> bytes | None:
    """The APPn/COM segment to write (marker included), or None to drop it."""
    if marker == 0xE0:
        # JFIF stays (decoders read its colour-space hint); its thumbnail goes, it may show what a crop removed.
        if payload.startswith(b"JFIF\x00") and len(payload) >= _JFIF_HEADER_BYTES:
            body = payload[: _JFIF_HEADER_BYTES - 2] + b"\x00\x00"
            return b"\xff\xe0" + (len(body) + 2).to_bytes(2, "big") + body
        return None  # JFXX thumbnails and anything else
    if marker == 0xE2 and payload.startswith(b"ICC_PROFILE\x00"):
        return b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload  # colour, not metadata
    if marker == 0xEE:
        return b"\xff\xee" + (len(payload) + 2).to_bytes(2, "big") + payload  # Adobe colour transform flag
    return None  # APP1 EXIF/XMP, other APP2 (MPF, FPXR), APP3..APP13, APP15, COM


_PNG_KEPT_CHUNKS = frozenset(
    {
        b"IHDR",
        b"PLTE",
        b"IDAT",
        b"IEND",
        b"tRNS",
        b"gAMA",
        b"cHRM",
        b"sRGB",
        b"iCCP",
        b"sBIT",
        b"pHYs",
        b"acTL",
        b"fcTL",
        b"fdAT",
    }
)


def _strip_png(data: bytes, field: str) -> bytes:
    size = len(data)
    view = memoryview(data)
    out = [data[:8]]
    pos = 8
    while True:
        if pos + 12 > size:
            raise _malformed(field, "PNG", "it ends before its IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > size:
            raise _malformed(field, "PNG", "a chunk runs past the end of the data")
        if not kind.isalpha():
            raise _malformed(field, "PNG", "a chunk has an invalid type")
        if pos == 8 and kind != b"IHDR":
            raise _malformed(field, "PNG", "it does not start with an IHDR chunk")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise _malformed(field, "PNG", f"the {kind.decode()} chunk has a bad checksum")
        if kind in _PNG_KEPT_CHUNKS:
            out.append(data[pos:end])
        elif not kind[0] & 0x20:  # an unknown critical chunk: the PNG spec says a decoder must not guess
            raise _malformed(field, "PNG", f"it has an unknown critical chunk {kind.decode()}")
        pos = end
        if kind == b"IEND":
            return b"".join(out)  # bytes after IEND are dropped


_WEBP_KEPT_CHUNKS = frozenset({b"VP8X", b"ICCP", b"ANIM", b"ANMF", b"ALPH", b"VP8 ", b"VP8L"})
_VP8X_METADATA_FLAGS = 0x08 | 0x04  # EXIF and XMP present


def _strip_webp(data: bytes, field: str) -> bytes:
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        raise _malformed(field, "WEBP", "it is shorter than its RIFF header says")
    chunks: list[bytes] = []
    pos = 12
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise _malformed(field, "WEBP", "it ends inside a chunk header")
        fourcc = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + length
        if end > riff_end:
            raise _malformed(field, "WEBP", "a chunk runs past the end of the data")
        # Odd chunks carry a pad byte; a missing one at the very end is tolerated and written back.
        padding = b"\x00" if length & 1 else b""
        if fourcc == b"VP8X":
            if pos != 12 or length < 10:
                raise _malformed(field, "WEBP", "its VP8X chunk is misplaced or too short")
            chunk = bytearray(data[pos:end])
            chunk[8] &= ~_VP8X_METADATA_FLAGS & 0xFF
            chunks.append(bytes(chunk) + padding)
        elif fourcc in _WEBP_KEPT_CHUNKS:
            chunks.append(data[pos:end] + padding)
        pos = min(end + len(padding), riff_end)  # EXIF, XMP and unknown chunks are dropped
    if not chunks:
        raise _malformed(field, "WEBP", "it has no image data")
    body = b"".join(chunks)
    return b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WEBP" + body  # bytes after the RIFF are dropped


_GIF_KEPT_APPLICATIONS = (b"NETSCAPE2.0", b"ANIMEXTS1.0")  # the loop count; everything else (XMP, ICC) goes


def _strip_gif(data: bytes, field: str) -> bytes:
    size = len(data)
    if size < 13:
        raise _malformed(field, "GIF", "it ends inside its header")
    pos = 13 + _gif_colour_table_size(data[10])
    if pos > size:
        raise _malformed(field, "GIF", "it ends inside its colour table")
    out = [data[:pos]]
    while pos < size:  # a missing trailer is common and harmless: one is written back
        introducer = data[pos]
        if introducer == 0x3B:
            break
        if introducer == 0x21:
            if pos + 2 > size:
                raise _malformed(field, "GIF", "it ends inside an extension")
            label = data[pos + 1]
            end = _skip_gif_sub_blocks(data, pos + 2, field)
            application = data[pos + 3 : pos + 14] if data[pos + 2] == 11 else b""
            if label == 0xFE or (label == 0xFF and application not in _GIF_KEPT_APPLICATIONS):
                pos = end
                continue
            out.append(data[pos:end])
            pos = end
        elif introducer == 0x2C:
            if pos + 11 > size:
                raise _malformed(field, "GIF", "it ends inside an image descriptor")
            start_of_data = pos + 10 + _gif_colour_table_size(data[pos + 9]) + 1  # + LZW minimum code size
            end = _skip_gif_sub_blocks(data, start_of_data, field)
            out.append(data[pos:end])
            pos = end
        else:
            raise _malformed(field, "GIF", f"it has an unknown block 0x{introducer:02X}")
    out.append(b"\x3b")
    return b"".join(out)


def _gif_colour_table_size(packed: int) -> int:
    return 3 << ((packed & 0x07) + 1) if packed & 0x80 else 0


def _skip_gif_sub_blocks(data: bytes, pos: int, field: str) -> int:
    size = len(data)
    while True:
        if pos >= size:
            raise _malformed(field, "GIF", "it ends inside a data block")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


# ----------------------------------------------------------------------------------------------- encoding


def _without_metadata(image: Image.Image) -> Image.Image:
    # Pillow's savers read some metadata from image.info by default (PNG icc_profile, JPEG comment), so an
    # image with info is saved from a copy that keeps only its transparency.
    if not set(image.info) - {"transparency"}:
        return image
    bare = image.copy()
    bare.info = {key: value for key, value in image.info.items() if key == "transparency"}
    return bare


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` with no metadata chunks (no text, EXIF or ICC profile)."""
    buffer = io.BytesIO()
    _without_metadata(image).save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes of ``image`` at ``quality`` (1..100) with no EXIF, XMP, ICC profile or comment."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, not {quality}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    _without_metadata(image).save(buffer, format="JPEG", quality=quality, optimize=False)
    return buffer.getvalue()
