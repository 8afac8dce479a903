"""vision/decode.py: client images are checked before any pixel is decoded, decoded to oriented RGB, and their
encoded bytes lose every piece of metadata without a pixel changing. All images are made here with Pillow."""

from __future__ import annotations

import base64
import io
import pickle
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, PngImagePlugin
from pydantic import ValidationError

from aiflow_ray.vision.decode import (
    DecodedImage,
    ImageInputError,
    ImageLimits,
    RemoteImageRef,
    check_image_count,
    decode_image,
    encode_jpeg,
    encode_png,
    parse_image_url,
    sniff_format,
    strip_metadata,
)

FIELD = "images[0]"
LIMITS = ImageLimits()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAKE_ICC = b"not really an ICC profile, but kept as colour data"


# ----------------------------------------------------------------------------------------------- helpers


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image whose pixels all differ enough that a rotation or a flip shows."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decoded_pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.mode, image.size, image.tobytes()


def expect_error(call: Callable[[], object], status: int, field: str = FIELD) -> ImageInputError:
    with pytest.raises(ImageInputError) as caught:
        call()
    error = caught.value
    message = str(error)
    assert (error.status, error.field) == (status, field), message
    assert field in message
    assert "Traceback" not in message and "Error" not in message and "\n" not in message
    return error


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunk_types(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but carries (almost) none: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of the segments before the first scan."""
    segments, pos = [], 2
    while True:
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segments.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:
            return segments


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 12
    while pos < len(data):
        fourcc, length = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunks.append((fourcc, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length + (length & 1)
    return chunks


def riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        fourcc + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")
        for fourcc, payload in chunks
    )
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def exif_with_gps(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPS IFD
    return exif


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image is decoded: the refusals must come from the header alone."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ---------------------------------------------------------------------------------------- valid images


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80})],
)
def test_valid_images_decode_with_their_size(fmt: str, params: dict[str, Any]) -> None:
    data = encoded(gradient(64, 48), fmt, **params)
    image = decode_image(data, FIELD, LIMITS)
    assert isinstance(image, DecodedImage)
    assert (image.format, image.width, image.height, image.orientation) == (fmt, 64, 48, 1)
    assert image.pixels.mode == "RGB" and image.pixels.size == (64, 48) and image.pixels.info == {}
    assert image.raw_bytes == len(data)
    assert sniff_format(image.clean) == fmt
    assert decoded_pixels(image.clean) == decoded_pixels(data)


def test_a_twelve_megapixel_photo_passes_the_default_limits() -> None:
    data = encoded(Image.new("RGB", (4032, 3024), (90, 120, 150)), "JPEG", quality=60)
    image = decode_image(data, FIELD, LIMITS)
    assert (image.width, image.height) == (4032, 3024)
    assert LIMITS.max_image_bytes >= 10 * 1024 * 1024


def smooth_photo(width: int, height: int, seed: int = 3) -> Image.Image:
    """A camera-sized picture of smooth colour (what a reduced decode should keep)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height),
                                                                                  Image.Resampling.BICUBIC)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_photo_bound_for_a_small_input_decodes_at_reduced_scale(orientation: int) -> None:
    """A JPEG is decoded at the smallest DCT scale that keeps twice the size it is resized to: the pixels are
    an eighth of the photo's side (orientation applied), its own size is still reported, and resizing them
    gives nearly the tile a full decode gives."""
    data = encoded(smooth_photo(4032, 3024), "JPEG", quality=92, exif=exif_with_gps(orientation).tobytes())
    asked: list[tuple[int, int]] = []

    def needed(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return 112, 112

    full = decode_image(data, FIELD, LIMITS)
    reduced = decode_image(data, FIELD, LIMITS, needed_size=needed)
    size = (4032, 3024) if orientation == 1 else (3024, 4032)
    assert asked == [size]  # the oriented size, before any pixel is decoded
    assert (reduced.width, reduced.height) == (full.width, full.height) == size
    assert reduced.pixels.size == (size[0] // 8, size[1] // 8)
    assert reduced.orientation == orientation and reduced.clean == full.clean

    def tile(image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((112, 112), Image.Resampling.BICUBIC), np.int16)

    difference = np.abs(tile(reduced.pixels) - tile(full.pixels))
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())
    # Nothing to gain on a small image, and nothing but a JPEG has reduced scales.
    assert decode_image(encoded(smooth_photo(200, 150), "JPEG"), FIELD, LIMITS, needed_size=needed).pixels.size == (
        200, 150)
    png = decode_image(encoded(smooth_photo(1600, 1200), "PNG"), FIELD, LIMITS, needed_size=needed)
    assert png.pixels.size == (1600, 1200)


def test_a_given_orientation_replaces_the_exif_one() -> None:
    data = encoded(gradient(64, 48), "JPEG", quality=92, exif=exif_with_gps(6).tobytes())
    assert decode_image(data, FIELD, LIMITS, orientation=1).pixels.size == (64, 48)
    assert decode_image(data, FIELD, LIMITS, orientation=8).pixels.size == (48, 64)
    assert decode_image(data, FIELD, LIMITS, orientation=99).orientation == 1  # out of range: as taken


# ------------------------------------------------------------------------------------ metadata removal


def test_jpeg_orientation_is_applied_and_exif_with_gps_is_removed_losslessly() -> None:
    source = gradient(64, 48)
    data = encoded(source, "JPEG", quality=92, exif=exif_with_gps(6).tobytes())
    with Image.open(io.BytesIO(data)) as original:
        assert original.getexif().get_ifd(0x8825), "the test image must carry GPS data"
        expected = ImageOps.exif_transpose(original).convert("RGB")

    image = decode_image(data, FIELD, LIMITS)
    assert image.orientation == 6
    assert (image.width, image.height) == (48, 64)  # rotated: width and height swap
    assert image.pixels.tobytes() == expected.tobytes()

    assert b"Exif" not in image.clean and b"SecretCam" not in image.clean
    with Image.open(io.BytesIO(image.clean)) as clean:
        exif = clean.getexif()
        assert len(exif) == 0 and not exif.get_ifd(0x8825)
        assert clean.size == (64, 48)  # the clean bytes are not re-oriented; orientation says how
    assert decoded_pixels(image.clean) == decoded_pixels(data)


def test_jpeg_keeps_jfif_icc_and_adobe_and_drops_every_other_segment_and_trailer() -> None:
    data = encoded(gradient(40, 30), "JPEG", quality=85, icc_profile=FAKE_ICC, comment=b"secret comment")
    soi, rest = data[:2], data[2:]
    jfif, rest = rest[:18], rest[18:]  # Pillow's JFIF APP0 comes first
    assert jfif[4:9] == b"JFIF\x00"
    jfif_with_thumbnail = jpeg_segment(0xE0, jfif[4:16] + b"\x01\x01" + b"THM")  # a 1x1 RGB thumbnail
    extra = b"".join(
        [
            jpeg_segment(0xE0, b"JFXX\x00\x10secret thumbnail"),
            jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>secret</x:xmpmeta>"),
            jpeg_segment(0xE2, b"FPXR\x00secret"),
            jpeg_segment(0xED, b"Photoshop 3.0\x00secret"),
            jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01"),
            jpeg_segment(0xEF, b"secret"),
            jpeg_segment(0xFE, b"another secret"),
        ]
    )
    tampered = soi + jfif_with_thumbnail + extra + b"\xff" + rest + b"secret motion-photo video"

    clean = strip_metadata(tampered, "JPEG", field=FIELD)
    assert b"secret" not in clean and b"THM" not in clean
    assert clean.endswith(b"\xff\xd9")
    segments = jpeg_segments(clean)
    app = [(marker, payload[:12]) for marker, payload in segments if 0xE0 <= marker <= 0xEF or marker == 0xFE]
    assert app == [
        (0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01"),
        (0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01"),
        (0xE2, b"ICC_PROFILE\x00"),
    ]
    assert dict(segments)[0xE0][12:] == b"\x00\x00"  # thumbnail size zeroed, thumbnail gone
    with Image.open(io.BytesIO(clean)) as image:
        assert image.info.get("icc_profile") == FAKE_ICC
        assert "comment" not in image.info
    assert decoded_pixels(clean) == decoded_pixels(data)
    assert decoded_pixels(decode_image(tampered, FIELD, LIMITS).clean) == decoded_pixels(data)


def test_progressive_jpeg_with_restart_markers_strips_to_identical_pixels() -> None:
    data = encoded(gradient(96, 80), "JPEG", quality=75, progressive=True, exif=exif_with_gps(1).tobytes())
    # Restart intervals put 0xFFD0..D7 inside the scans, which the scan walker must step over.
    with_restarts = encoded(gradient(96, 80), "JPEG", quality=75, restart_marker_blocks=1)
    for source in (data, with_restarts):
        clean = strip_metadata(source, "JPEG", field=FIELD)
        assert b"Exif" not in clean
        assert decoded_pixels(clean) == decoded_pixels(source)


def test_png_text_exif_time_and_private_chunks_are_removed_losslessly() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret text")
    info.add_text("Author", "secret author", zip=True)
    info.add_itxt("Description", "secret itxt", lang="en", tkey="Description")
    info.add(b"tIME", struct.pack(">HBBBBB", 2024, 5, 6, 7, 8, 9))
    info.add(b"prVt", b"secret private chunk")
    data = encoded(gradient(50, 40), "PNG", pnginfo=info, exif=exif_with_gps(1).tobytes(), icc_profile=FAKE_ICC)
    data += b"secret after IEND"
    assert {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"prVt", b"iCCP"} <= set(png_chunk_types(data))

    image = decode_image(data, FIELD, LIMITS)
    kinds = png_chunk_types(image.clean)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert set(kinds) <= {b"IHDR", b"iCCP", b"IDAT", b"IEND"}
    assert b"iCCP" in kinds
    assert b"secret" not in image.clean and b"Exif" not in image.clean
    assert decoded_pixels(image.clean) == decoded_pixels(data)


def test_webp_exif_and_xmp_chunks_and_flags_are_removed_losslessly() -> None:
    xmp = b"<x:xmpmeta>secret xmp, odd length</x:xmpmeta>"
    assert len(xmp) % 2 == 1
    data = encoded(
        gradient(30, 20), "WEBP", lossless=True, exif=exif_with_gps(1).tobytes(), xmp=xmp, icc_profile=FAKE_ICC
    )
    before = dict(riff_chunks(data))
    assert {b"VP8X", b"EXIF", b"XMP ", b"ICCP"} <= set(before)
    assert before[b"VP8X"][0] & 0x0C == 0x0C

    image = decode_image(data, FIELD, LIMITS)
    after = riff_chunks(image.clean)
    kinds = [fourcc for fourcc, _ in after]
    assert b"EXIF" not in kinds and b"XMP " not in kinds and b"ICCP" in kinds
    assert dict(after)[b"VP8X"][0] & 0x0C == 0
    assert dict(after)[b"VP8X"][0] & 0x20  # the ICC flag stays
    assert struct.unpack("<I", image.clean[4:8])[0] == len(image.clean) - 8
    assert b"secret" not in image.clean
    assert decoded_pixels(image.clean) == decoded_pixels(data)


def test_webp_odd_sized_and_unknown_chunks_anywhere_are_dropped_with_their_padding() -> None:
    data = encoded(gradient(30, 20), "WEBP", lossless=True, exif=b"Exif\x00\x00MM\x00*", icc_profile=FAKE_ICC)
    chunks = dict(riff_chunks(data))
    reordered = riff(
        [
            (b"VP8X", chunks[b"VP8X"]),
            (b"ICCP", chunks[b"ICCP"]),
            (b"EXIF", b"odd"),
            (b"UNKN", b"secret, 17 bytes!"),
            (b"VP8L", chunks[b"VP8L"]),
            (b"XMP ", b"x"),
        ]
    )
    clean = strip_metadata(reordered + b"trailing secret", "WEBP", field=FIELD)
    assert [fourcc for fourcc, _ in riff_chunks(clean)] == [b"VP8X", b"ICCP", b"VP8L"]
    assert b"secret" not in clean
    assert decoded_pixels(clean) == decoded_pixels(data)


def test_animated_images_decode_their_first_frame_and_gif_comments_go() -> None:
    red, blue = Image.new("RGB", (24, 16), (255, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 255))
    gif = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0, comment=b"secret")
    webp = encoded(red, "WEBP", save_all=True, append_images=[blue], duration=100, loop=0, lossless=True)
    limits = ImageLimits(formats=("GIF", "WEBP"))
    for data in (gif, webp):
        image = decode_image(data, FIELD, limits)
        assert (image.width, image.height) == (24, 16)
        assert image.pixels.getpixel((5, 5)) == (255, 0, 0)
        assert b"secret" not in image.clean
        with Image.open(io.BytesIO(image.clean)) as clean, Image.open(io.BytesIO(data)) as original:
            assert getattr(clean, "n_frames", 1) == getattr(original, "n_frames", 1) == 2
    assert decoded_pixels(strip_metadata(gif, "GIF", field=FIELD)) == decoded_pixels(gif)


def test_bmp_decodes_when_allowed() -> None:
    data = encoded(gradient(20, 10), "BMP")
    image = decode_image(data, FIELD, ImageLimits(formats=("BMP",)))
    assert (image.format, image.width, image.height, image.clean) == ("BMP", 20, 10, data)


# ------------------------------------------------------------------------------------- size and pixels


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG, built row block by row block so that the test itself never holds its pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = (b"\x00" + bytes((width + 7) // 8)) * 1000
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(rows) for _ in range(height // 1000)]
    idat = b"".join(parts) + compressor.flush()
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header_without_allocating(no_pixel_decoding: None) -> None:
    data = bomb_png(30_000, 30_000)
    assert len(data) < 1_000_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = expect_error(lambda: decode_image(data, FIELD, LIMITS), 413)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 50 * 1024 * 1024
    assert "50,000,000" in str(error)


@pytest.mark.parametrize(("width", "height"), [(10_000, 6_000), (10_000, 10_000)])
def test_pixel_count_from_the_header_is_checked_before_decoding(
    width: int, height: int, no_pixel_decoding: None
) -> None:
    # 60M is under Pillow's own thresholds (our check refuses it); 100M trips Pillow's warning, made an error.
    error = expect_error(lambda: decode_image(png_header_only(width, height), FIELD, LIMITS), 413)
    assert "pixels" in str(error)
    if width * height == 60_000_000:
        assert "60,000,000 pixels" in str(error)


def test_bytes_over_the_limit_are_refused_without_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(gradient(64, 64), "PNG")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image was opened")

    monkeypatch.setattr(Image, "open", refuse)
    limits = ImageLimits(max_image_bytes=1000)
    error = expect_error(lambda: decode_image(data, FIELD, limits), 413)
    assert f"{len(data):,} bytes" in str(error) and "1,000" in str(error)


@pytest.mark.parametrize(("width", "height"), [(201, 1), (1, 201), (0, 10)])
def test_zero_sizes_and_absurd_aspect_ratios_are_refused(width: int, height: int, no_pixel_decoding: None) -> None:
    expect_error(lambda: decode_image(png_header_only(width, height), FIELD, LIMITS), 400)


def test_an_aspect_ratio_of_two_hundred_passes() -> None:
    assert decode_image(encoded(gradient(200, 1), "PNG"), FIELD, LIMITS).width == 200


# ------------------------------------------------------------------------------------ formats and junk


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_formats_not_allowed_are_415_naming_the_format(fmt: str, name: str, no_pixel_decoding: None) -> None:
    data = encoded(gradient(16, 16), fmt)
    assert sniff_format(data) == fmt
    error = expect_error(lambda: decode_image(data, FIELD, LIMITS), 415)
    assert name in str(error)


def test_the_declared_type_is_not_trusted_the_bytes_decide() -> None:
    png = encoded(gradient(8, 8), "PNG")
    url = "data:image/jpeg;base64," + base64.b64encode(png).decode()
    data = parse_image_url(url, FIELD, LIMITS)
    assert isinstance(data, bytes)
    assert decode_image(data, FIELD, LIMITS).format == "PNG"
    gif_as_png = "data:image/png;base64," + base64.b64encode(encoded(gradient(8, 8), "GIF")).decode()
    gif = parse_image_url(gif_as_png, FIELD, LIMITS)
    assert isinstance(gif, bytes)
    expect_error(lambda: decode_image(gif, FIELD, LIMITS), 415)


def corrupt_inputs() -> dict[str, bytes]:
    jpeg = encoded(gradient(64, 48), "JPEG", quality=90)
    png = encoded(gradient(64, 48), "PNG")
    bad_ihdr_crc = bytearray(png)
    bad_ihdr_crc[29] ^= 0xFF  # the IHDR CRC: 8 signature + 4 length + 4 type + 13 data
    idat = png.index(b"IDAT")
    idat_length = struct.unpack(">I", png[idat - 4 : idat])[0]
    bad_idat_crc = bytearray(png)
    bad_idat_crc[idat + 4 + idat_length] ^= 0xFF  # Pillow skips IDAT CRCs; strip_metadata does not
    return {
        "random": np.random.default_rng(0).bytes(2000),
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "truncated PNG": png[: len(png) // 2],
        "empty": b"",
        "PNG with a bad IHDR CRC": bytes(bad_ihdr_crc),
        "PNG with a bad IDAT CRC": bytes(bad_idat_crc),
        "PNG magic then junk": PNG_SIGNATURE + b"junk" * 10,
        "JPEG magic then junk": b"\xff\xd8\xff" + b"junk" * 10,
        "WebP magic then junk": b"RIFF\x20\x00\x00\x00WEBPjunk" + b"\x00" * 24,
        "BM then junk": b"BM" + b"junk" * 10,
    }


@pytest.mark.parametrize("name", list(corrupt_inputs()))
def test_corrupt_or_truncated_input_is_400_naming_the_field(name: str) -> None:
    data = corrupt_inputs()[name]
    limits = ImageLimits(formats=("JPEG", "PNG", "WEBP", "BMP"))
    expect_error(lambda: decode_image(data, "messages[2].content[1]", limits), 400, "messages[2].content[1]")


def test_strip_metadata_refuses_malformed_structure() -> None:
    jpeg = encoded(gradient(16, 16), "JPEG")
    png = encoded(gradient(16, 16), "PNG")
    webp = encoded(gradient(16, 16), "WEBP")
    cases = [
        (jpeg[: len(jpeg) - 2], "JPEG"),  # no EOI
        (jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9", "JPEG"),  # EOI before any scan
        (png[: png.index(b"IEND") - 4], "PNG"),  # no IEND
        (png[:8] + png_chunk(b"ABCD", b"x") + png[8:], "PNG"),  # an unknown critical chunk first
        (webp[:4] + struct.pack("<I", len(webp)) + webp[8:], "WEBP"),  # RIFF size past the end
        (png, "JPEG"),  # the bytes are not the format named
    ]
    for data, fmt in cases:
        expect_error(lambda data=data, fmt=fmt: strip_metadata(data, fmt, field=FIELD), 400)


# ---------------------------------------------------------------------------------------------- modes


def rgba_png(colour: tuple[int, int, int, int]) -> bytes:
    return encoded(Image.new("RGBA", (8, 8), colour), "PNG")


def palette(transparency: int | None) -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    return encoded(image, "PNG") if transparency is None else encoded(image, "PNG", transparency=transparency)


def sixteen_bit(value: int) -> bytes:
    return encoded(Image.new("I;16", (8, 8), value), "PNG")


MODE_CASES = {
    "P": (lambda: palette(None), (200, 100, 50)),
    "P transparent": (lambda: palette(1), (255, 255, 255)),
    "LA transparent": (lambda: encoded(Image.new("LA", (8, 8), (100, 0)), "PNG"), (255, 255, 255)),
    "LA opaque": (lambda: encoded(Image.new("LA", (8, 8), (100, 255)), "PNG"), (100, 100, 100)),
    "RGBA transparent": (lambda: rgba_png((255, 0, 0, 0)), (255, 255, 255)),
    "RGBA opaque": (lambda: rgba_png((255, 0, 0, 255)), (255, 0, 0)),
    "RGBA half": (lambda: rgba_png((0, 0, 0, 128)), (127, 127, 127)),
    "CMYK": (lambda: encoded(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95), (255, 255, 255)),
    "I;16 full": (lambda: sixteen_bit(65535), (255, 255, 255)),
    "I;16 half": (lambda: sixteen_bit(32768), (128, 128, 128)),
    "1": (lambda: encoded(Image.new("1", (8, 8), 1), "PNG"), (255, 255, 255)),
    "L": (lambda: encoded(Image.new("L", (8, 8), 77), "PNG"), (77, 77, 77)),
    "WebP RGBA": (lambda: encoded(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "WEBP", lossless=True), (255, 255, 255)),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_every_mode_ends_rgb(name: str) -> None:
    build, expected = MODE_CASES[name]
    data = build()
    image = decode_image(data, FIELD, LIMITS)
    assert image.pixels.mode == "RGB", name
    assert image.pixels.info == {}
    actual = image.pixels.getpixel((3, 3))
    assert isinstance(actual, tuple)
    assert all(abs(a - e) <= 2 for a, e in zip(actual, expected, strict=True)), (name, actual)
    assert decoded_pixels(image.clean) == decoded_pixels(data)


# ------------------------------------------------------------------------------------------ data URLs


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_a_valid_data_url_gives_its_bytes() -> None:
    png = encoded(gradient(8, 8), "PNG")
    assert parse_image_url(data_url(png), FIELD, LIMITS) == png
    assert parse_image_url(data_url(png).replace("data:image/png", "DATA:Image/PNG"), FIELD, LIMITS) == png


@pytest.mark.parametrize(
    "url",
    [
        "data:text/plain;base64,aGVsbG8=",  # not an image type
        "data:image/png,aGVsbG8=",  # not base64
        "data:image/png;charset=utf-8;base64,aGVsbG8=",
        "image/png;base64,aGVsbG8=",  # no scheme
        "data:image/png;base64,",  # empty
        "data:image/png;base64,aGVs!G8=",  # a character outside the alphabet
        "data:image/png;base64,aGVs bG8=",  # whitespace
        "data:image/png;base64,aGVsbG8",  # bad padding
        "data:image/png;base64,aGVsbG8=\u00e9",  # non-ASCII
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "javascript:alert(1)",
        "",
    ],
)
def test_malformed_or_unsupported_urls_are_400_naming_the_field(url: str) -> None:
    expect_error(lambda: parse_image_url(url, FIELD, LIMITS), 400)


def test_an_oversized_data_url_is_413_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiflow_ray.vision.decode as decode

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the payload was decoded")

    limits = ImageLimits(max_image_bytes=300)
    just_fits = data_url(bytes(300))
    assert isinstance(parse_image_url(just_fits, FIELD, limits), bytes)
    monkeypatch.setattr(decode.binascii, "a2b_base64", refuse)
    expect_error(lambda: parse_image_url(data_url(bytes(400)), FIELD, limits), 413)
    expect_error(lambda: parse_image_url("data:image/png;base64," + "A" * 10_000_000, FIELD, limits), 413)


def test_remote_urls_are_refused_unless_enabled_and_allowed() -> None:
    error = expect_error(lambda: parse_image_url("http://example.com/x.png", FIELD, LIMITS), 400)
    assert "disabled" in str(error) and "data URL" in str(error)

    limits = ImageLimits(allow_remote_urls=True, url_allow_list=("images.example.com", "CDN.Example.org."))
    ref = parse_image_url("https://images.example.com:8443/a/b.jpg?x=1", FIELD, limits)
    assert ref == RemoteImageRef(url="https://images.example.com:8443/a/b.jpg?x=1", host="images.example.com")
    assert isinstance(parse_image_url("http://cdn.example.org/x.png", FIELD, limits), RemoteImageRef)

    error = expect_error(lambda: parse_image_url("https://evil.example.net/x.png", FIELD, limits), 400)
    assert "evil.example.net" in str(error) and "not allowed" in str(error)
    for url in (
        "https://images.example.com@evil.example.net/x.png",  # the host is evil.example.net
        "https://user:pw@images.example.com/x.png",
        "https://images.example.com\\@evil.example.net/x.png",
        "https://images.example.com/x.png\n",
        "https:///x.png",
        "file:///etc/passwd",
    ):
        expect_error(lambda url=url: parse_image_url(url, FIELD, limits), 400)


# ------------------------------------------------------------------------------- limits, errors, globals


def test_limits_validate_and_describe_every_field() -> None:
    assert all(info.description for info in ImageLimits.model_fields.values())
    assert ImageLimits(formats=("jpeg", "WebP", "JPEG")).formats == ("JPEG", "WEBP")
    for bad in ({"formats": ("TIFF",)}, {"formats": ("SVG",)}, {"formats": ()}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            ImageLimits(**bad)
    assert ImageLimits(url_allow_list=("Images.Example.COM.",)).url_allow_list == ("images.example.com",)
    with pytest.raises(ValidationError):
        ImageLimits(url_allow_list=("https://images.example.com",))


def test_image_count_is_limited() -> None:
    check_image_count(4, "messages", LIMITS)
    expect_error(lambda: check_image_count(5, "messages", LIMITS), 400, "messages")


def test_errors_survive_pickling_with_status_and_field() -> None:
    error = ImageInputError(FIELD, 413, f"{FIELD} is too large")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.field, copy.status, str(copy)) == (FIELD, 413, f"{FIELD} is too large")
    assert isinstance(copy, ValueError)


def test_pillow_globals_are_left_alone() -> None:
    max_pixels = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageInputError):
        decode_image(png_header_only(10_000, 10_000), FIELD, LIMITS)
    with pytest.raises(ImageInputError):
        decode_image(b"\xff\xd8\xff" + b"junk", FIELD, LIMITS)
    assert max_pixels == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------- encoders


def test_encoders_write_no_metadata_even_when_the_image_carries_some() -> None:
    image = gradient(32, 24)
    image.info.update(
        {"exif": exif_with_gps(6).tobytes(), "icc_profile": FAKE_ICC, "comment": b"secret", "xmp": b"secret"}
    )
    png = encode_png(image)
    assert set(png_chunk_types(png)) <= {b"IHDR", b"IDAT", b"IEND"}
    jpeg = encode_jpeg(image, quality=80)
    assert [marker for marker, _ in jpeg_segments(jpeg) if 0xE1 <= marker <= 0xEF or marker == 0xFE] == []
    assert b"secret" not in png and b"secret" not in jpeg
    assert decoded_pixels(png) == decoded_pixels(encoded(gradient(32, 24), "PNG"))
    assert image.info["comment"] == b"secret"  # the caller's image is not modified
    assert decode_image(jpeg, FIELD, LIMITS).width == 32
    with pytest.raises(ValueError):
        encode_jpeg(image, quality=0)
    assert encode_jpeg(Image.new("RGBA", (4, 4)), quality=50).startswith(b"\xff\xd8\xff")
