"""Lossless removal of metadata (EXIF with GPS, XMP, comments, text chunks) from encoded image bytes.

What leaves the device carries the pixels and nothing else: segments and chunks are dropped, pixels are never
re-encoded, so a stripped image decodes to exactly the pixels of the client's.
"""

from __future__ import annotations

import re
import zlib

from aiflow_ray.vision.formats import _DISPLAY_NAMES, ImageInputError, _quoted, sniff_format


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
