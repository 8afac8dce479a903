"""Image formats by their magic bytes, and the error every refused client image raises."""

from __future__ import annotations

from typing import Any

# Pillow format names that a deployment may allow; TIFF is sniffed only so that it can be refused by name.
_DISPLAY_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF"}


class ImageInputError(ValueError):
    """A client image refused: ``status`` is the HTTP status, the message names ``field`` in one sentence."""

    def __init__(self, field: str, status: int, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions between processes; the default would call __init__ with the message alone.
        return (type(self), (self.field, self.status, str(self)))


def _quoted(text: str, limit: int = 80) -> str:
    """Client text echoed in a message, shortened so a hostile value cannot flood logs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
