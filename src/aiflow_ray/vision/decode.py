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
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from aiflow_ray.config.images import SUPPORTED_FORMATS, ImageLimits
from aiflow_ray.vision.formats import _DISPLAY_NAMES, ImageInputError, _quoted, sniff_format
from aiflow_ray.vision.metadata import strip_metadata

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

MAX_ASPECT_RATIO = 200
# A JPEG decoded at reduced scale keeps at least this factor over the size it is resized to next, so that the
# resize still averages over several source pixels per output pixel (Pillow's thumbnail uses the same gap).
DRAFT_GAP = 2.0

NeededSize = Callable[[int, int], tuple[int, int]]

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
    width: int  # the image's own size, after orientation (pixels is smaller when decoded at a reduced scale)
    height: int
    raw_bytes: int  # encoded size the client sent
    clean: bytes  # the client's encoding, metadata removed losslessly (not re-oriented: see orientation)
    orientation: int  # EXIF orientation 1..8 applied to pixels; clean still needs it, since its EXIF is gone


def _formats_list(formats: tuple[str, ...], conjunction: str) -> str:
    names = [_DISPLAY_NAMES.get(name, name) for name in formats]
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


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


def decode_image(data: bytes, field: str, limits: ImageLimits, *, needed_size: NeededSize | None = None,
                 orientation: int | None = None) -> DecodedImage:
    """Check and decode one client image (first frame only) into oriented RGB pixels plus metadata-free bytes.

    Every cheap check runs before a pixel is decoded: byte size (413), magic bytes against the allowed formats
    (415), then the header's dimensions against ``max_image_pixels`` (413), zero sizes and aspect ratios over
    200:1 (400). Corrupt or truncated data is a 400.

    ``needed_size`` maps the oriented image's size to the largest size the caller will resize it to; a JPEG is
    then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that stays at least ``DRAFT_GAP`` times that size,
    as Pillow's ``thumbnail`` does. A 12-megapixel photo bound for a model's input decodes about 12x faster,
    and its pixels never sit in memory at full size. The device and the edge decode a raw image with the same
    ``needed_size``, so both see the same pixels. ``orientation`` replaces the EXIF orientation (the edge's raw
    payload carries it beside bytes whose EXIF was removed).
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
            if orientation is not None and orientation not in _TRANSPOSE_FOR_ORIENTATION:
                orientation = 1
            if needed_size is not None and fmt == "JPEG":  # a JPEG's EXIF is in its header, read at open
                turned = (orientation or _exif_orientation(image)) >= 5  # these swap width and height
                need_w, need_h = needed_size(*((height, width) if turned else (width, height)))
                if turned:
                    need_w, need_h = need_h, need_w
                image.draft(None, (max(1, int(need_w * DRAFT_GAP)), max(1, int(need_h * DRAFT_GAP))))
            image.load()  # the first frame only: animated GIF/WebP frames after it are never decoded
            if orientation is None:  # a PNG's EXIF may follow its pixels
                orientation = _exif_orientation(image)
            oriented_size = (height, width) if orientation >= 5 else (width, height)
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
        width=oriented_size[0],
        height=oriented_size[1],
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
