"""What a deployment accepts from clients as images (checked by ``aiflow_ray.vision.decode``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Formats the decoder can check and clean; a deployment allows a subset (ImageLimits.formats).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


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
        False,
        description="Accept http(s) image URLs from the hosts in url_allow_list (the ingress fetches them, bounded "
        "in bytes and time, following redirects only within the list); off means data URLs only.",
    )
    url_allow_list: tuple[str, ...] = Field(
        (), description="Host names whose http(s) image URLs are accepted when allow_remote_urls is on."
    )
    url_fetch_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Whole-fetch limit for one remote image (connect, redirects, body), seconds."
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
