"""Knowledge-base ingestion as a Ray job: embedding spread over the cluster by Ray Data, one new snapshot.

    ray job submit --address http://127.0.0.1:8265 -- \\
        python -m aiflow_ray.jobs.ingest --snapshots /mnt/kb/snapshots --input /mnt/corpus

The driver reads the files (text, markdown, JSONL, as ``aiflow kb ingest``), keeps only the documents that
are new or changed against the latest published version, and hands their chunks to Ray Data: a pool of
embedding actors (one model load each, ``--actors`` at most, one CPU each) embeds them in batches wherever
the cluster has CPUs, and the driver gathers the vectors in order. It then writes the new version on its
local disk and publishes it on the shared volume in one rename (rag/snapshots.py); running cloud replicas
swap it in within their ``kb.refresh_interval_s`` without failing a request. Old versions are pruned after
a grace period. Prints a JSON summary; exits 2 on a file it cannot read, before anything is published.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aiflow_ray.config import KbArgs
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.snapshots import EmbeddingCache, SnapshotStore
from aiflow_ray.rag.store import IngestError, read_documents

log = get_logger(__name__)


class _EmbedBatch:
    """A Ray Data actor: loads the embedder once, then embeds batch after batch."""

    def __init__(self) -> None:
        from aiflow_ray.rag.embedder import Embedder

        self.embedder = Embedder(threads=1)  # one CPU per actor: more actors, not more threads each

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": batch["row"], "vector": self.embedder.embed([str(t) for t in batch["text"]])}


def embed_on_cluster(texts: list[str], actors: int, batch_size: int) -> np.ndarray:
    """[len(texts), 384] embeddings computed by Ray Data on the connected cluster, in input order."""
    import ray

    from aiflow_ray.rag.embedder import EMBEDDING_DIM

    vectors = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    if not texts:
        return vectors
    blocks = max(1, min(len(texts) // batch_size + 1, 4 * actors))
    dataset = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=blocks)
    embedded = dataset.map_batches(_EmbedBatch, batch_size=batch_size, batch_format="numpy",
                                   compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=1)
    seen = 0
    for batch in embedded.iter_batches(batch_size=1024, batch_format="numpy"):
        vectors[batch["row"]] = batch["vector"]
        seen += len(batch["row"])
    if seen != len(texts):
        raise RuntimeError(f"Ray Data returned {seen} embeddings for {len(texts)} chunks")
    return vectors


def run(inputs: list[Path], snapshots: Path, actors: int = 4, batch_size: int = 64, chunk_chars: int = 1000,
        overlap_chars: int = 200, keep: int = 3, grace_s: float = 600.0) -> dict[str, Any]:
    import ray

    from aiflow_ray.rag.embedder import EMBEDDER_NAME, EMBEDDING_DIM

    started = time.perf_counter()
    documents = [doc for path in inputs for doc in read_documents(path)]  # a bad file fails before any work
    store = SnapshotStore(snapshots, chunk_chars, overlap_chars)
    base = store.latest_version()
    pending = store.pending(documents)
    texts = list(dict.fromkeys(t for doc in pending for t in store.texts_to_embed(doc)))
    log.info("%d documents read, %d new or changed against v%d: %d chunks to embed", len(documents), len(pending),
             base, len(texts))
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # the cluster the job was submitted to
    embedded_at = time.perf_counter()
    cache = EmbeddingCache(EMBEDDER_NAME, EMBEDDING_DIM)
    cache.add(texts, embed_on_cluster(texts, actors, batch_size))
    embed_s = time.perf_counter() - embedded_at
    stats, version = store.ingest(documents, cache)
    pruned = store.prune(keep=keep, grace_s=grace_s)
    return {"version": version, "base_version": base, **stats.__dict__, "chunks_embedded": len(texts),
            "embed_s": round(embed_s, 3), "total_s": round(time.perf_counter() - started, 3), "pruned": pruned,
            **{k: v for k, v in store.stats().items() if k in ("documents", "chunks", "path")}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aiflow_ray.jobs.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="files or directories to ingest")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="the snapshot directory on the shared volume (default: AIFLOW_KB_SNAPSHOTS)")
    parser.add_argument("--actors", type=int, default=4, help="most embedding actors (one CPU each)")
    parser.add_argument("--batch-size", type=int, default=64, help="chunks per embedding batch")
    # Defaults from the one place the served knowledge base takes them (KbArgs).
    for flag, field, kind in (("--chunk-chars", "chunk_chars", int), ("--overlap-chars", "overlap_chars", int),
                              ("--keep", "snapshots_keep", int), ("--grace-s", "snapshots_grace_s", float)):
        info = KbArgs.model_fields[field]
        parser.add_argument(flag, dest=field, type=kind, default=info.default,
                            help=f"{info.description} (default: {info.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from aiflow_ray import envs

    snapshots = args.snapshots or envs.kb_snapshots_dir()
    if snapshots is None:
        parser.error("--snapshots is required when AIFLOW_KB_SNAPSHOTS is not set")
    if args.actors < 1 or args.batch_size < 1 or args.snapshots_keep < 1:
        parser.error("--actors, --batch-size and --keep must be at least 1")
    try:
        summary = run(args.input, snapshots, args.actors, args.batch_size, args.chunk_chars, args.overlap_chars,
                      args.snapshots_keep, args.snapshots_grace_s)
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
