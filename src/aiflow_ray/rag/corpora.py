"""Demo corpora, shipped by reference and fetched by the setup: Python's documentation topics and FOLDOC.

- ``pydoc``: ``pydoc_data.topics`` (built into CPython): one document per topic, source
  ``pydoc:<topic>`` (e.g. ``pydoc:with``).
- ``foldoc``: the Free On-line Dictionary of Computing from the Debian package ``dict-foldoc``
  (GFDL), fetched with ``apt-get download`` and read from its dictd files without dpkg: one document
  per entry, source ``foldoc:<term>``.

Each corpus is written as JSONL (``{"source", "title", "text"}`` per line) under
``AIFLOW_HOME/corpora/``, which ``aiflow kb ingest`` reads like any other JSONL file.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

FOLDOC_PACKAGE = "dict-foldoc"
CORPORA = ("pydoc", "foldoc")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def corpora_dir() -> Path:
    return envs.aiflow_home() / "corpora"


def pydoc_documents() -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield {"source": f"pydoc:{topic}", "title": topic, "text": topics[topic].strip()}


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)


def _foldoc_files(deb: bytes) -> tuple[bytes, bytes]:
    """(index, dict) from the package's data archive."""
    for name, member in _ar_members(deb):
        if not name.startswith("data.tar"):
            continue
        raw = lzma.decompress(member) if name.endswith(".xz") else gzip.decompress(member) if name.endswith(
            ".gz") else member
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            files = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            index = tar.extractfile(files["foldoc.index"])
            body = tar.extractfile(files["foldoc.dict.dz"])
            assert index is not None and body is not None
            return index.read(), gzip.decompress(body.read())
    raise ValueError("the package has no data archive")


def parse_foldoc(index: bytes, body: bytes) -> Iterator[dict[str, str]]:
    """One document per definition; synonyms (headwords sharing a definition) keep the first term."""
    seen: set[str] = set()
    seen_spans: set[tuple[int, int]] = set()
    for line in index.decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        term, offset, length = parts[0], _dictd_number(parts[1]), _dictd_number(parts[2])
        if term.startswith("00database") or term.startswith("00-database") or term in seen:
            continue
        if (offset, length) in seen_spans:
            continue
        seen.add(term)
        seen_spans.add((offset, length))
        text = body[offset : offset + length].decode("utf-8", "replace").strip()
        if text:
            yield {"source": f"foldoc:{term}", "title": term, "text": text}


def download_foldoc_deb(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"{FOLDOC_PACKAGE}_*.deb"))
    if existing:
        return existing[-1]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", FOLDOC_PACKAGE], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get download {FOLDOC_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        deb = next(Path(tmp).glob("*.deb"))
        target = dest / deb.name
        deb.replace(target)
    log.info("downloaded %s", target.name)
    return target


def fetch(name: str) -> Path:
    """Write the corpus as JSONL (once) and return its path."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: {', '.join(CORPORA)}")
    out = corpora_dir() / f"{name}.jsonl"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "pydoc":
        docs = list(pydoc_documents())
    else:
        deb = download_foldoc_deb(envs.aiflow_home() / "downloads")
        docs = list(parse_foldoc(*_foldoc_files(deb.read_bytes())))
    partial = out.with_suffix(".partial")
    with partial.open("w") as handle:
        for doc in docs:
            handle.write(json.dumps(doc) + "\n")
    partial.replace(out)
    log.info("corpus %s: %d documents -> %s", name, len(docs), out)
    return out
