"""What of an image crosses the device-edge link, and how the edge turns it back into model input.

The request option ``image_upload`` picks the representation (task-oriented communication: send what the
verifier needs, not the raw sensor data):
- ``raw``: the client's encoded bytes, metadata removed losslessly (the baseline). The edge decodes them
  and preprocesses them itself.
- ``resized``: the verifier's own preprocessing done on the device (``vision.preprocess.image_tiles``), the
  uint8 tiles sent as one lossless PNG. The edge sees the same tiles it would have computed from ``raw``, so
  the output is the same, for a fraction of the bytes.
- ``jpeg``: the same tiles, lossy; the quality follows the link's bandwidth (``jpeg_quality_for``).
- ``features``: the vision encoder's output (before the projector), int8 per row with a float32 scale, for
  a device whose model shares the verifier's encoder; the message carries the encoder's digest and an edge
  with another encoder refuses it.
- ``auto``: the lossless representation with the lowest predicted time to the verifier's input, at the link's
  measured bandwidth (``upload_s``); lossy ones only when the request allows them, since they may change the
  output. ``resized`` wins for a camera photo at the served pair's resolution; with a fine tiling (InternVL's
  released 12 tiles of 448 px) the lossless tiles outweigh the photo's JPEG and ``raw`` wins on a slow link.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np
from PIL import Image

from aiflow_ray.config.generation import UploadMode
from aiflow_ray.engines.base import ImageInput
from aiflow_ray.network.messages import ImageEncoding, ImagePayload, WireError
from aiflow_ray.tiers.trace import Trace
from aiflow_ray.vision.decode import ImageInputError, ImageLimits, decode_image, encode_jpeg, encode_png
from aiflow_ray.vision.preprocess import TileShapeError, VisionSpec, image_tiles

UPLOAD_MODES: tuple[UploadMode, ...] = get_args(UploadMode)
LOSSLESS: tuple[UploadMode, ...] = ("raw", "resized")
ENCODING_OF: dict[str, ImageEncoding] = {"raw": ImageEncoding.RAW, "resized": ImageEncoding.TILES_PNG,
                                         "jpeg": ImageEncoding.TILES_JPEG, "features": ImageEncoding.FEATURES}
MODE_OF = {encoding: mode for mode, encoding in ENCODING_OF.items()}

_FEATURES_HEAD = struct.Struct("<8sII")  # encoder digest (first 8 bytes), rows, width

def jpeg_quality_for(bandwidth_bps: float) -> int:
    """Higher quality where bytes are cheap: 60 at 250 KB/s and below, 90 at 4 MB/s and above."""
    if bandwidth_bps <= 0:
        return 60
    scale = np.clip(np.log2(bandwidth_bps / 250e3) / 4.0, 0.0, 1.0)
    return round(60 + 30 * float(scale))


@dataclass(frozen=True)
class PreparedImage:
    """One image on the device: its tiles (what the drafter sees) and what goes over the link."""

    tiles: np.ndarray  # [n, S, S, 3] uint8
    payload: ImagePayload
    mode: UploadMode  # the representation used ("auto" resolved)
    raw_bytes: int  # what the client sent
    # upload_s of each candidate weighed (the one mode asked for, or auto's candidates)
    predicted_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def sent_bytes(self) -> int:
        return len(self.payload.data)


def stack_tiles(tiles: np.ndarray) -> Image.Image:
    """[n, H, W, 3] -> one W x (n*H) image, the layout both tile encodings use (for a whole-image model,
    n = 1: the resized image itself)."""
    n, height, width = tiles.shape[:3]
    return Image.fromarray(np.ascontiguousarray(tiles.reshape(n * height, width, 3)), "RGB")


def quantize_features(features: np.ndarray, encoder_digest: str) -> bytes:
    """float32 [rows, width] -> digest, shape, one float32 scale per row, int8 values."""
    rows, width = features.shape
    scale = np.maximum(np.abs(features).max(axis=1), 1e-12).astype(np.float32) / np.float32(127.0)
    values = np.clip(np.rint(features / scale[:, None]), -127, 127).astype(np.int8)
    return (_FEATURES_HEAD.pack(bytes.fromhex(encoder_digest)[:8], rows, width) + scale.astype("<f4").tobytes()
            + values.tobytes())


def dequantize_features(data: bytes, encoder_digest: str, max_rows: int) -> np.ndarray:
    if len(data) < _FEATURES_HEAD.size:
        raise WireError("image features are truncated")
    digest, rows, width = _FEATURES_HEAD.unpack_from(data)
    if digest != bytes.fromhex(encoder_digest)[:8]:
        raise WireError("image features come from another vision encoder; send pixels (image_upload resized)")
    if not 1 <= rows <= max_rows or not 1 <= width <= 65_536:
        raise WireError(f"image features of {rows} x {width} are out of bounds")
    expected = _FEATURES_HEAD.size + 4 * rows + rows * width
    if len(data) != expected:
        raise WireError(f"image features of {len(data)} bytes; {rows} x {width} needs {expected}")
    scale = np.frombuffer(data, "<f4", rows, _FEATURES_HEAD.size)
    if not np.all(np.isfinite(scale)):
        raise WireError("image feature scales must be finite")
    values = np.frombuffer(data, np.int8, rows * width, _FEATURES_HEAD.size + 4 * rows).reshape(rows, width)
    return values.astype(np.float32) * scale[:, None]


def prepare_image(data: bytes, field: str, mode: UploadMode, spec: VisionSpec, limits: ImageLimits,
                  bandwidth_bps: float = 1e6, features: Callable[[np.ndarray], np.ndarray] | None = None,
                  encoder_digest: str | None = None, lossy_ok: bool = False) -> PreparedImage:
    """Decode a client's image safely, preprocess it as the verifier would, and encode it for the link.

    ``features`` (the drafter's encoder, with ``encoder_digest``) is given only when the drafter shares the
    verifier's encoder; ``lossy_ok`` lets ``auto`` consider jpeg too.
    """
    started = time.perf_counter()
    decoded = decode_image(data, field, limits, needed_size=spec.input_size)
    tiles = image_tiles(decoded.pixels, spec, (decoded.width, decoded.height))
    # The device decodes and tiles every image anyway (its drafter sees the tiles); this time is what the edge
    # would spend again on a raw upload, on the same code.
    decode_s = time.perf_counter() - started
    lossless: list[UploadMode] = list(LOSSLESS)
    candidates: list[UploadMode] = [mode] if mode != "auto" else [*lossless, "jpeg"] if lossy_ok else lossless
    tile_share = tiles.size / max(1, decoded.width * decoded.height * 3)
    best: ImagePayload | None = None
    best_mode: UploadMode = candidates[0]
    predicted: dict[str, float] = {}
    for candidate in candidates:
        payload = _encode(candidate, decoded.clean, decoded.orientation, tiles, bandwidth_bps, features,
                          encoder_digest, field)
        edge_s = decode_s if candidate == "raw" else 0.0 if candidate == "features" else decode_s * tile_share
        predicted[candidate] = upload_s(len(payload.data), bandwidth_bps, edge_s)
        if best is None or predicted[candidate] < predicted[best_mode]:
            best, best_mode = payload, candidate
    assert best is not None
    return PreparedImage(tiles, best, best_mode, decoded.raw_bytes, predicted)


def upload_s(sent_bytes: int, bandwidth_bps: float, edge_decode_s: float) -> float:
    """Seconds from the device's encoded image to the verifier's input tensor: the bytes on the link plus the
    edge's decoding (and, for a raw image, its preprocessing), estimated from the device's own time on the same
    code: a raw image at the device's full measured time, tiles at the same time per pixel. The device's
    encoding is left out: it encodes every candidate to learn its size, so it is spent whichever is chosen."""
    return sent_bytes / max(bandwidth_bps, 1.0) + edge_decode_s


def _encode(mode: UploadMode, clean: bytes, orientation: int, tiles: np.ndarray, bandwidth_bps: float,
            features: Callable[[np.ndarray], np.ndarray] | None, encoder_digest: str | None,
            field: str) -> ImagePayload:
    if mode == "raw":
        return ImagePayload(ImageEncoding.RAW, clean, orientation)
    if mode == "resized":
        return ImagePayload(ImageEncoding.TILES_PNG, encode_png(stack_tiles(tiles)))
    if mode == "jpeg":
        return ImagePayload(ImageEncoding.TILES_JPEG, encode_jpeg(stack_tiles(tiles), jpeg_quality_for(bandwidth_bps)))
    if features is None or encoder_digest is None:
        raise ImageInputError(field, 400, "image_upload 'features' needs a device model that shares the verifier's "
                                          "vision encoder, and this deployment's do not")
    return ImagePayload(ImageEncoding.FEATURES, quantize_features(features(tiles), encoder_digest))


def receive_image(payload: ImagePayload, spec: VisionSpec, limits: ImageLimits,
                  encoder_digest: str | None = None) -> ImageInput:
    """The edge's side: the payload back into engine input, checked as strictly as the device checked the
    client's bytes (the edge trusts nothing that crossed the link). Errors are ``WireError``."""
    field = "image"
    try:
        if payload.encoding is ImageEncoding.RAW:  # decoded as the device decoded it (prepare_image)
            decoded = decode_image(payload.data, field, limits, needed_size=spec.input_size,
                                   orientation=payload.orientation)
            return ImageInput(tiles=image_tiles(decoded.pixels, spec, (decoded.width, decoded.height)))
        if payload.encoding is ImageEncoding.FEATURES:
            if encoder_digest is None:
                raise WireError("this verifier takes no image features")
            return ImageInput(features=dequantize_features(payload.data, encoder_digest,
                                                           spec.max_tokens_per_image))
        decoded = decode_image(payload.data, field, limits)
    except ImageInputError as exc:
        raise WireError(f"image payload: {exc}") from None
    width, height = decoded.pixels.size
    size = spec.tile_size
    try:
        if spec.whole_image:
            shape: tuple[int, ...] = (1, height, width, 3)
            # Exactly a size the verifier's own resizing produces: a resize of it would change nothing.
            fits = spec.grid(width, height) == (width // size, height // size)
        else:
            shape = (height // max(size, 1), size, size, 3)
            fits = width == size and height % size == 0
        spec.tokens_for(shape)
    except TileShapeError:
        fits = False
    if not fits:
        raise WireError(f"image tiles of {width} x {height} px do not fit this verifier's {size} px "
                        f"{'cells' if spec.whole_image else 'tiles'}")
    tiles = np.asarray(decoded.pixels, np.uint8).reshape(shape)
    return ImageInput(tiles=np.ascontiguousarray(tiles))


def image_inputs(images: Sequence[PreparedImage]) -> list[ImageInput]:
    """What the drafter's own model sees: the tiles, whatever representation crosses the link."""
    return [ImageInput(tiles=image.tiles) for image in images]


def trace_images(trace: Trace, images: Sequence[PreparedImage]) -> None:
    if images:
        trace.image_upload = ",".join(sorted({image.mode for image in images}))
        trace.image_bytes_raw = sum(image.raw_bytes for image in images)
        trace.image_bytes_each = [image.sent_bytes for image in images]
