"""Captioned scenes of Fashion-MNIST items: the data set of the captioning pair (``captioning.py``).

This module owns fetching Fashion-MNIST, composing scenes from its items and captioning them. A scene is a
``TILE_SIZE`` square RGB canvas with a dark grey background, cut into a 2x2 grid of cells (top left, top right,
bottom left, bottom right); one to three cells hold an item, enlarged twice (28 to ``ITEM_SIZE`` pixels, the
cell's size) and moved by up to ``JITTER_PX`` pixels each way. Items keep Fashion-MNIST's grey levels, mapped
affinely onto ``BACKGROUND``..255, so no detail of an item is lost to the background. The caption is a pure
function of the layout, items in reading order::

    one item: in the top left a bag.
    two items: in the top left a bag and in the bottom right a sandal.
    three items: in the top left a t-shirt, in the top right a sandal and in the bottom left an ankle boot.

The position comes before the item so that, when the model names an item, the cell to look at is the one it
has just written, not one it has yet to find (a much easier lesson for a model trained in minutes).

Only the five classes of ``CLASS_NOUNS`` appear: T-shirt/top, trouser, sandal, bag and ankle boot. Pullover,
coat and shirt are left out because even large models confuse them with each other and with T-shirts; dress
(confused with T-shirts) and sneaker (with sandals and boots) because a model trained in minutes on two cores
then misses too many items for the 90% of whole captions right that the pair is built to reach.

Scenes of the ``"train"`` split use only items of Fashion-MNIST's train split and scenes of the ``"test"``
split only items of its test split; test items whose pixels equal a train item's are dropped, so no item
image of a held-out scene is ever seen in training. Everything is drawn from a seeded numpy generator, so a
split is a pure function of (name, count, seed).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package: used in place when it is installed
system-wide, otherwise downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` under
``aiflow_home()/data/fashion-mnist`` (no root-wide change). Nothing here imports torch.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

TILE_SIZE = 112  # pixels; also the vision tower's image_size, so serving's resize is the identity
CELL_SIZE = TILE_SIZE // 2
ITEM_SIZE = 56  # pixels: a 28-pixel item enlarged 2x fills its cell
JITTER_PX = 2  # the item's corner moves up to this far from its cell's corner, each axis (clipped at the edge)
BACKGROUND = 64  # grey level of the canvas; items are drawn brighter

POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells in reading order
# Fashion-MNIST label -> noun phrase with its article.
CLASS_NOUNS: dict[int, str] = {
    0: "a t-shirt",
    1: "a pair of trousers",
    5: "a sandal",
    8: "a bag",
    9: "an ankle boot",
}
CLASSES = tuple(sorted(CLASS_NOUNS))
COUNT_WORDS = ("one item", "two items", "three items")
MAX_ITEMS = len(COUNT_WORDS)
SPLITS = ("train", "test")

DEBIAN_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetUnavailableError(RuntimeError):
    """Fashion-MNIST is neither installed system-wide nor obtainable with apt-get."""


@dataclass(frozen=True)
class Placement:
    """One item of a scene: which cell, which Fashion-MNIST image, and where inside the cell."""

    cell: int  # index into POSITIONS
    label: int  # Fashion-MNIST label, one of CLASSES
    index: int  # the item's index in its Fashion-MNIST split
    offset_px: tuple[int, int]  # (x, y) of the item's top-left corner from its cell's, within +-JITTER_PX


@dataclass(frozen=True)
class Layout:
    """What a scene shows: its split and its items in reading order (ascending cells)."""

    split: str
    placements: tuple[Placement, ...]


class Scene(NamedTuple):
    image: Image.Image  # RGB, TILE_SIZE x TILE_SIZE
    caption: str
    layout: Layout


# -- Fashion-MNIST -----------------------------------------------------------------------------------------


def _find_idx_dir(root: Path) -> Path | None:
    """The directory under ``root`` holding all four idx files, if any."""
    if not root.exists():
        return None
    for hit in sorted(root.rglob(_IDX_FILES["train"][0])):
        if all((hit.parent / name).is_file() for names in _IDX_FILES.values() for name in names):
            return hit.parent
    return None


def fashion_mnist_dir(home: Path | None = None) -> Path:
    """The directory of Fashion-MNIST's gzip'd idx files, fetching the Debian package once when needed."""
    found = _find_idx_dir(SYSTEM_DIR)
    if found is not None:
        return found
    cache = (home or envs.aiflow_home()) / "data" / "fashion-mnist"
    found = _find_idx_dir(cache)
    if found is not None:
        return found
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".fashion-mnist-") as tmp:
        work = Path(tmp)
        deb = _download_deb(work)
        unpacked = work / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], "unpack")
        if _find_idx_dir(unpacked) is None:
            raise DatasetUnavailableError(f"{deb.name} holds no Fashion-MNIST idx files")
        shutil.rmtree(cache, ignore_errors=True)
        unpacked.rename(cache)  # atomic: a crash leaves no half-unpacked cache
    found = _find_idx_dir(cache)
    assert found is not None
    log.info("fetched Fashion-MNIST (%s) into %s", DEBIAN_PACKAGE, found)
    return found


def _download_deb(work: Path) -> Path:
    # As root, apt drops privileges to _apt for downloads, which cannot write into our private temp dir.
    command = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", DEBIAN_PACKAGE]
    try:
        first = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DatasetUnavailableError(_help("apt-get is not available")) from exc
    if first.returncode != 0:
        # Fresh containers ship without package lists; refresh them once and retry.
        log.info("apt-get download failed (%s); running apt-get update", first.stderr.strip()[-200:])
        _run(["apt-get", "update", "-q"], "apt-get update")
        _run(command, "apt-get download", cwd=work)
    debs = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise DatasetUnavailableError(_help("apt-get download produced no .deb"))
    return debs[0]


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DatasetUnavailableError(_help(f"{command[0]} is not available")) from exc
    if done.returncode != 0:
        raise DatasetUnavailableError(_help(f"{what} failed ({done.returncode}): {done.stderr.strip()[-400:]}"))


def _help(reason: str) -> str:
    return (
        f"cannot obtain Fashion-MNIST: {reason}. Install Debian's {DEBIAN_PACKAGE} package "
        f"(apt-get install {DEBIAN_PACKAGE}, files under {SYSTEM_DIR}) or make `apt-get download "
        f"{DEBIAN_PACKAGE}` work (needs a Debian package source and network)."
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file's array (big-endian header: magic, then one uint32 per dimension)."""
    raw = gzip.decompress(path.read_bytes())
    header = np.frombuffer(raw, ">u4", count=1)[0]
    if header != magic:
        raise DatasetUnavailableError(f"{path} is not an idx file (magic {header:#x})")
    ndim = magic & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_split(split: str, home: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of a Fashion-MNIST split, restricted to ``CLASSES``.

    Indices in ``Placement.index`` refer to these restricted arrays. Test items with the exact pixels of
    some train item are dropped, so held-out scenes never show an image seen in training.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = fashion_mnist_dir(home)
    images_name, labels_name = _IDX_FILES[split]
    images = _read_idx(root / images_name, 0x0803)
    labels = _read_idx(root / labels_name, 0x0801)
    keep = np.isin(labels, CLASSES)
    if split == "test":
        train_images, _ = load_split("train", home)
        seen = {hashlib.blake2b(item.tobytes(), digest_size=16).digest() for item in train_images}
        fresh = np.array([hashlib.blake2b(item.tobytes(), digest_size=16).digest() not in seen for item in images])
        keep &= fresh
    return images[keep].copy(), labels[keep].copy()


@functools.lru_cache(maxsize=4)
def _indices_by_label(split: str, home: Path | None) -> dict[int, np.ndarray]:
    _, labels = load_split(split, home)
    return {label: np.flatnonzero(labels == label) for label in CLASSES}


# -- scenes ------------------------------------------------------------------------------------------------


def caption_for(layout: Layout) -> str:
    """The caption of a layout: count, then each item with its position, in reading order."""
    count = len(layout.placements)
    if not 1 <= count <= MAX_ITEMS:
        raise ValueError(f"a scene holds 1 to {MAX_ITEMS} items, not {count}")
    phrases = [f"in the {POSITIONS[p.cell]} {CLASS_NOUNS[p.label]}" for p in layout.placements]
    listed = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{COUNT_WORDS[count - 1]}: {listed}."


def random_layout(rng: np.random.Generator, split: str, home: Path | None = None, items: int | None = None) -> Layout:
    """A layout drawn from ``rng``: ``items`` items (default: 1 to 3, uniform) in distinct cells, classes
    uniform and independent. Four items (every cell full) is allowed for rendering but has no caption."""
    by_label = _indices_by_label(split, home)
    count = int(rng.integers(1, MAX_ITEMS + 1)) if items is None else items
    if not 1 <= count <= len(POSITIONS):
        raise ValueError(f"a layout holds 1 to {len(POSITIONS)} items, not {count}")
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=count, replace=False))
    placements = []
    for cell in cells:
        label = int(CLASSES[int(rng.integers(len(CLASSES)))])
        index = int(rng.choice(by_label[label]))
        dx, dy = (int(v) for v in rng.integers(-JITTER_PX, JITTER_PX + 1, size=2))
        placements.append(Placement(cell=cell, label=label, index=index, offset_px=(dx, dy)))
    return Layout(split=split, placements=tuple(placements))


def render(layout: Layout, home: Path | None = None) -> Image.Image:
    """The RGB image of a layout."""
    images, labels = load_split(layout.split, home)
    canvas = np.full((TILE_SIZE, TILE_SIZE), float(BACKGROUND), np.float32)
    cells = [p.cell for p in layout.placements]
    if cells != sorted(set(cells)):
        raise ValueError(f"placements must be in distinct cells in reading order, got cells {cells}")
    for p in layout.placements:
        if int(labels[p.index]) != p.label:
            raise ValueError(f"item {p.index} of {layout.split} is label {labels[p.index]}, not {p.label}")
        dx, dy = p.offset_px
        if max(abs(dx), abs(dy)) > JITTER_PX:
            raise ValueError(f"offset {p.offset_px} exceeds the jitter of {JITTER_PX} pixels")
        item = Image.fromarray(images[p.index]).resize((ITEM_SIZE, ITEM_SIZE), Image.Resampling.BILINEAR)
        # Fashion-MNIST draws items bright on black: mapping 0..255 affinely onto BACKGROUND..255 keeps every
        # grey level of the item distinct (no information lost) and makes its black surround the canvas.
        value = np.asarray(item, np.float32) * ((255.0 - BACKGROUND) / 255.0)
        top = (p.cell // 2) * CELL_SIZE + (CELL_SIZE - ITEM_SIZE) // 2 + dy
        left = (p.cell % 2) * CELL_SIZE + (CELL_SIZE - ITEM_SIZE) // 2 + dx
        # Clip to the canvas: a jittered item may lose a sliver at the border (Fashion-MNIST margins are black).
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + ITEM_SIZE, TILE_SIZE), min(left + ITEM_SIZE, TILE_SIZE)
        # An item fills its cell, so jittered neighbours may overlap by a few (mostly black) pixels: the brighter
        # one wins there, and elsewhere this is simply drawing the item over the canvas.
        window = canvas[y0:y1, x0:x1]
        np.maximum(window, BACKGROUND + value[y0 - top : y1 - top, x0 - left : x1 - left], out=window)
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey, grey, grey], axis=-1))  # HxWx3 uint8 -> RGB


def compose_scene(layout: Layout, home: Path | None = None) -> Scene:
    """Render a layout of 1 to 3 items: (RGB image, caption, layout)."""
    caption = caption_for(layout)
    return Scene(image=render(layout, home), caption=caption, layout=layout)


def iter_scenes(name: str, seed: int, home: Path | None = None) -> Iterator[Scene]:
    """An endless stream of scenes of split ``name``; ``make_split`` is its first ``count`` scenes."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(name)])
    while True:
        yield compose_scene(random_layout(rng, name, home), home)


def make_split(name: str, count: int, seed: int, home: Path | None = None) -> list[Scene]:
    """``count`` scenes of split ``name`` ("train" or "test"), a pure function of its arguments."""
    return list(itertools.islice(iter_scenes(name, seed, home), count))


def all_captions() -> list[str]:
    """Every caption a scene can have (the tokenizer's training text)."""
    out: list[str] = []

    def walk(cell: int, chosen: Sequence[Placement]) -> None:
        if chosen:
            out.append(caption_for(Layout("train", tuple(chosen))))
        if len(chosen) == MAX_ITEMS:
            return
        for nxt in range(cell, len(POSITIONS)):
            for label in CLASSES:
                walk(nxt + 1, [*chosen, Placement(nxt, label, 0, (0, 0))])

    walk(0, [])
    return out
