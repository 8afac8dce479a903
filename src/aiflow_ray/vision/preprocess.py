"""The verifier's image preprocessing, reproduced exactly on the device: tiling, resizing, normalising.

InternVL cuts an image into square tiles of the vision tower's input size (448 px for released checkpoints):
with ``crop_to_patches`` it picks the grid of ``min_tiles..max_tiles`` tiles whose aspect ratio is closest to
the image's, resizes the image to that grid (bicubic), cuts it, and adds a thumbnail of the whole image when
there is more than one tile; without it, the image is resized to one tile. Each tile becomes
``tokens_per_tile`` visual tokens (patches after pixel shuffle).

The device and the edge both call ``image_tiles`` on the same decoded pixels, so the uint8 tiles are equal bit
for bit wherever they are computed: the ``resized`` upload sends those tiles losslessly and the verifier sees
the very tensor it would have computed from the raw upload, for a fraction of the bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def fingerprint(self) -> str:
        """Two models agree on it exactly when they turn an image into the same tiles and token count."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of tiles for an image of this size, without the thumbnail."""
        if not self.crop_to_patches:
            return 1, 1
        return closest_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def num_tiles(self, width: int, height: int) -> int:
        cols, rows = self.grid(width, height)
        return cols * rows + (1 if cols * rows > 1 else 0)

    def num_tokens(self, width: int, height: int) -> int:
        return self.num_tiles(width, height) * self.tokens_per_tile

    @property
    def max_tokens_per_image(self) -> int:
        return (self.max_tiles + (1 if self.max_tiles > 1 and self.crop_to_patches else 0)) * self.tokens_per_tile

    @classmethod
    def from_model_dir(cls, path: str | Path, config: Any) -> VisionSpec:
        """From an InternVL-style config (``config``, a transformers config) and the directory's
        ``preprocessor_config.json`` (size, tiling, mean and std), with InternVL's defaults where absent."""
        processor: dict[str, Any] = {}
        file = Path(path) / "preprocessor_config.json"
        if file.exists():
            processor = json.loads(file.read_text())
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


def image_tiles(image: Image.Image, spec: VisionSpec) -> np.ndarray:
    """The tiles the model sees, as uint8 ``[n, tile, tile, 3]`` (the thumbnail last)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    tile = spec.tile_size
    cols, rows = spec.grid(*image.size)
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
