"""The verifier's image preprocessing, reproduced exactly on the device: tiling, resizing, normalising.

InternVL cuts an image into square tiles of the vision tower's input size (448 px for released checkpoints):
with ``crop_to_patches`` it picks the grid of ``min_tiles..max_tiles`` tiles whose aspect ratio is closest to
the image's, resizes the image to that grid (bicubic), cuts it, and adds a thumbnail of the whole image when
there is more than one tile; without it, the image is resized to one tile. Each tile becomes
``tokens_per_tile`` visual tokens (patches after pixel shuffle).

Qwen2-VL (and Qwen2.5-VL) instead resize the whole image, keeping its aspect ratio, to a size in multiples of
28 px (patch 14, 2 x 2 patches merged into one visual token) with its pixel count between ``min_pixels`` and
``max_pixels`` (``smart_resize``, as transformers' processor does); the "tiles" are then one array
``[1, H, W, 3]``, and each 28 x 28 cell of it is one visual token (``tile_size`` 28, ``tokens_per_tile`` 1).

The device and the edge both call ``image_tiles`` on the same decoded pixels, so the uint8 tiles are equal bit
for bit wherever they are computed: the ``resized`` upload sends those tiles losslessly and the verifier sees
the very tensor it would have computed from the raw upload, for a fraction of the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_VL_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})  # whole-image resizing, M-RoPE positions


@dataclass(frozen=True)
class VisionSpec:
    """What a vision-language model expects of an image, read from its config files."""

    tile_size: int  # pixels, the vision tower's square input
    tokens_per_tile: int  # visual tokens one tile becomes
    crop_to_patches: bool  # dynamic tiling (InternVL's default) or one resized tile
    min_tiles: int
    max_tiles: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str = "internvl"  # internvl: square tiles; qwen2vl: the whole image in multiples of tile_size
    patch_size: int = 14
    temporal_patch_size: int = 2  # qwen2vl: a still image is repeated over this many frames
    min_pixels: int = 0  # qwen2vl: bounds of the resized image's pixel count
    max_pixels: int = 0

    @property
    def whole_image(self) -> bool:
        return self.family == "qwen2vl"

    def tokens_for(self, shape: tuple[int, ...]) -> int:
        """Visual tokens of an image whose tiles have ``shape`` (checked: ``TileShapeError`` otherwise)."""
        if len(shape) != 4 or shape[3] != 3:
            raise TileShapeError(f"image tiles of shape {shape}; expected [n, height, width, 3]")
        n, height, width = shape[:3]
        cell = self.tile_size
        if self.whole_image:
            if n != 1 or height % cell or width % cell or not 1 <= height * width <= max(self.max_pixels, cell * cell):
                raise TileShapeError(f"an image of {width} x {height} px is not one {cell}-px-aligned image of at "
                                     f"most {self.max_pixels} pixels")
            return (height // cell) * (width // cell) * self.tokens_per_tile
        most = self.max_tiles + (1 if self.max_tiles > 1 and self.crop_to_patches else 0)
        if (height, width) != (cell, cell) or not 1 <= n <= most:
            raise TileShapeError(f"image tiles of shape {shape}; expected [1..{most}, {cell}, {cell}, 3]")
        return n * self.tokens_per_tile

    def fingerprint(self) -> str:
        """Two models agree on it exactly when they turn an image into the same tiles and token count."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of tiles for an image of this size, without the thumbnail."""
        if self.whole_image:
            resized_h, resized_w = smart_resize(height, width, self.tile_size, self.min_pixels, self.max_pixels)
            return resized_w // self.tile_size, resized_h // self.tile_size
        if not self.crop_to_patches:
            return 1, 1
        return closest_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to before it is cut into tiles (the thumbnail is smaller)."""
        cols, rows = self.grid(width, height)
        return cols * self.tile_size, rows * self.tile_size

    def num_tiles(self, width: int, height: int) -> int:
        cols, rows = self.grid(width, height)
        return cols * rows + (1 if cols * rows > 1 and not self.whole_image else 0)

    def num_tokens(self, width: int, height: int) -> int:
        return self.num_tiles(width, height) * self.tokens_per_tile

    @property
    def max_tokens_per_image(self) -> int:
        if self.whole_image:
            return self.max_pixels // (self.tile_size * self.tile_size) * self.tokens_per_tile
        return (self.max_tiles + (1 if self.max_tiles > 1 and self.crop_to_patches else 0)) * self.tokens_per_tile

    @classmethod
    def from_model_dir(cls, path: str | Path, config: Any) -> VisionSpec:
        """From an InternVL-style config (``config``, a transformers config) and the directory's
        ``preprocessor_config.json`` (size, tiling, mean and std), with InternVL's defaults where absent."""
        processor: dict[str, Any] = {}
        file = Path(path) / "preprocessor_config.json"
        if file.exists():
            processor = json.loads(file.read_text())
        if config.model_type in QWEN_VL_MODEL_TYPES:
            return cls.qwen_vl(processor, config)
        vision = config.vision_config
        image_size = vision.image_size
        tile = int(image_size[0] if isinstance(image_size, list | tuple) else image_size)
        patch = vision.patch_size
        patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
        size = processor.get("size") or {}
        if size and int(size.get("height", tile)) != tile:
            raise ValueError(f"the image processor resizes to {size}, the vision tower takes {tile} px")
        tokens = int((tile // patch) ** 2 * config.downsample_ratio**2)
        return cls(
            tile_size=tile, tokens_per_tile=tokens,
            crop_to_patches=bool(processor.get("crop_to_patches", True)),
            min_tiles=int(processor.get("min_patches", 1)), max_tiles=int(processor.get("max_patches", 12)),
            mean=tuple(float(v) for v in processor.get("image_mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in processor.get("image_std", IMAGENET_STD)),  # type: ignore[arg-type]
        )


    @classmethod
    def qwen_vl(cls, processor: dict[str, Any], config: Any) -> VisionSpec:
        """Qwen2-VL / Qwen2.5-VL: the processor's pixel bounds (``min_pixels``/``max_pixels``, or ``size``'s
        ``shortest_edge``/``longest_edge``), patch and merge sizes, with the released defaults."""
        vision = config.vision_config
        patch = int(processor.get("patch_size", vision.patch_size))
        merge = int(processor.get("merge_size", vision.spatial_merge_size))
        temporal = int(processor.get("temporal_patch_size", vision.temporal_patch_size))
        size = processor.get("size") or {}
        min_pixels = int(processor.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        max_pixels = int(processor.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        return cls(tile_size=patch * merge, tokens_per_tile=1, crop_to_patches=False, min_tiles=1,
                   max_tiles=max(max_pixels // (patch * merge) ** 2, 1),
                   mean=tuple(float(v) for v in processor.get("image_mean", OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in processor.get("image_std", OPENAI_CLIP_STD)),  # type: ignore[arg-type]
                   family="qwen2vl", patch_size=patch, temporal_patch_size=temporal, min_pixels=min_pixels,
                   max_pixels=max_pixels)


class TileShapeError(ValueError):
    """Tiles that no image preprocessed by this spec could have."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor``, the aspect ratio kept as closely as possible, the pixel
    count within [min_pixels, max_pixels] (transformers' ``smart_resize``, the same arithmetic)."""
    if max(height, width) / max(min(height, width), 1) > 200:
        raise TileShapeError(f"an image of {width} x {height} px is too elongated (aspect ratio over 200)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def closest_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's choice of grid: the closest aspect ratio; on a tie, the larger grid if the image has the
    pixels to fill half of it."""
    ratios = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_tiles <= i * j <= max_tiles}, key=lambda r: r[0] * r[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def image_tiles(image: Image.Image, spec: VisionSpec, source_size: tuple[int, int] | None = None) -> np.ndarray:
    """The tiles the model sees, as uint8 ``[n, tile, tile, 3]`` (the thumbnail last).

    ``source_size`` is the image's own size when ``image`` was decoded at a reduced scale: the grid is chosen
    from the image as it was taken, so a reduced decode changes the pixels' filtering, never the tiling.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    tile = spec.tile_size
    cols, rows = spec.grid(*(source_size or image.size))
    if spec.whole_image:  # one image, resized to whole cells: [1, H, W, 3]
        resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8)[None])
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    grid = np.asarray(resized, dtype=np.uint8)  # [rows*tile, cols*tile, 3]
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile, tile, 3)
    if rows * cols > 1:
        thumb = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC), dtype=np.uint8)
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return np.ascontiguousarray(tiles)


def normalize_tiles(tiles: np.ndarray, spec: VisionSpec) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, 3, H, W]``, scaled to 0..1 and standardised."""
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    pixels = (tiles.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def qwen_vl_patches(tiles: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 ``[1, H, W, 3]`` -> Qwen2-VL's ``pixel_values`` ``[patches, 3 * T * P * P]`` (the still image
    repeated over T frames, patches in 2 x 2 merge order) and its ``(t, h, w)`` grid, as transformers'
    processor lays them out."""
    image = normalize_tiles(tiles, spec)[0]  # [3, H, W]
    channels, height, width = image.shape
    patch, merge, frames = spec.patch_size, spec.tile_size // spec.patch_size, spec.temporal_patch_size
    grid_h, grid_w = height // patch, width // patch
    patches = image.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], frames, patch, patch))
    flat = patches.reshape(grid_h * grid_w, channels * frames * patch * patch)
    return np.ascontiguousarray(flat), (1, grid_h, grid_w)
