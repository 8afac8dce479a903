"""The models built on this machine (tiny random pairs for tests and `make run PROFILE=tiny`) build from an empty
AIFLOW_HOME, as on a new machine, and deterministically: their cache is keyed by a version number only, so two
machines must build the same weights from the same code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from aiflow_ray.models.tiny_qwen_vl import build_tiny_qwen_vl_pair
from aiflow_ray.models.tiny_vlm import build_tiny_vlm_pair


def _digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("build", [build_tiny_vlm_pair, build_tiny_qwen_vl_pair], ids=["internvl", "qwen2-vl"])
def test_tiny_vision_pairs_build_in_an_empty_home_and_the_same_everywhere(
        build: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    from aiflow_ray.engines.loader import load_engine

    first = build(tmp_path / "one")
    second = build(tmp_path / "two")
    for a, b in zip(first, second, strict=True):
        assert _digest(a) and _digest(a) == _digest(b)
    stamp = (first[0] / "config.json").stat().st_mtime_ns
    assert build(tmp_path / "one") == first and (first[0] / "config.json").stat().st_mtime_ns == stamp  # cached
    verifier = load_engine(str(first[0]), dtype="float32", device="cpu")
    drafter = load_engine(str(first[1]), dtype="float32", device="cpu")
    assert verifier.vision == drafter.vision and verifier.vocab_fingerprint() == drafter.vocab_fingerprint()
