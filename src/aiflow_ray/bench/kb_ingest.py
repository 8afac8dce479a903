"""Knowledge-base ingestion into snapshots and the swap a serving replica makes: measured side by side.

    python -m aiflow_ray.bench.kb_ingest --out docs/benchmarks     (make bench-kb)

1. The same corpus (the pydoc corpus and the first FOLDOC entries) ingested into a fresh snapshot directory
   three ways: in one process (what ``aiflow kb --snapshots ingest`` does), and through Ray Data on a local
   Ray instance with 1 and with 2 embedding actors (what the ingestion RayJob does, there on many nodes).
2. With a retriever serving the result (as a cloud replica does) and a thread querying it without pause,
   another writer publishes a changed version: how long publication takes, how long until the retriever
   serves the new version, query latency before and during the swap, and how many queries failed.
Writes kb_ingest.csv, kb_ingest.md and kb_ingest.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.snapshots import EmbeddingCache, SnapshotStore
from aiflow_ray.rag.store import Document, read_documents

log = get_logger(__name__)


def corpus(foldoc_entries: int) -> list[Document]:
    from aiflow_ray.rag import corpora

    docs = list(read_documents(corpora.fetch("pydoc")))
    return docs + list(read_documents(corpora.fetch("foldoc")))[:foldoc_entries]


def ingest_once(docs: list[Document], root: Path, actors: int | None) -> dict[str, Any]:
    """Ingest into an empty store: in this process (actors None) or through Ray Data."""
    from aiflow_ray.jobs import ingest as job
    from aiflow_ray.rag.embedder import EMBEDDER_NAME, EMBEDDING_DIM, Embedder

    store = SnapshotStore(root)
    started = time.perf_counter()
    texts = list(dict.fromkeys(t for d in store.pending(docs) for t in store.texts_to_embed(d)))
    if actors is None:
        cache = EmbeddingCache.around(Embedder())
        cache.add(texts, cache.embed(texts, batch_size=64))
    else:
        cache = EmbeddingCache(EMBEDDER_NAME, EMBEDDING_DIM)
        cache.add(texts, job.embed_on_cluster(texts, actors, batch_size=64))
    embedded = time.perf_counter()
    _, version = store.ingest(docs, cache)
    done = time.perf_counter()
    return {"mode": "one process" if actors is None else f"ray data, {actors} actor{'s' * (actors > 1)}",
            "chunks": len(texts), "embed_s": embedded - started, "publish_s": done - embedded,
            "total_s": done - started, "chunks_per_s": len(texts) / (done - started), "version": version,
            "size_bytes": store.manifest(version)["size_bytes"]}


def swap(root: Path, docs: list[Document]) -> dict[str, Any]:
    """Serve the store with a retriever while another writer publishes a changed version."""
    from aiflow_ray.rag.embedder import Embedder
    from aiflow_ray.rag.retriever import Retriever

    embedder = EmbeddingCache.around(Embedder())
    retriever = Retriever(SnapshotStore(root), embedder, refresh_interval_s=0.1)
    before_version = retriever.version
    latencies: list[tuple[float, float, int]] = []  # (time, seconds, version)
    errors: list[str] = []
    stop = threading.Event()

    def queries() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                retriever.search("garbage collection of unreachable objects", top_k=4)
                latencies.append((started, time.perf_counter() - started, retriever.version))
            except Exception as exc:  # counted, not raised: failures are what this measures
                errors.append(repr(exc))

    reader = threading.Thread(target=queries)
    reader.start()
    time.sleep(3.0)
    # The writer is another process (another pod, in a cluster): the CLI, as an operator would run it.
    changed = root.parent / "changed.jsonl"
    changed.write_text("".join(json.dumps({"source": d.source, "title": d.title, "text": d.text + "\n\n(revised)"})
                               + "\n" for d in docs[:100]))
    publish_started, publish_started_wall = time.perf_counter(), time.time()
    writer = subprocess.Popen([sys.executable, "-m", "aiflow_ray.cli", "kb", "--snapshots", str(root), "ingest",
                               str(changed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = SnapshotStore(root)
    while store.latest_version() == before_version and writer.poll() is None:
        time.sleep(0.005)
    version = store.latest_version()
    if version == before_version:
        raise RuntimeError(f"the writer published nothing (exit code {writer.wait()})")
    published = publish_started + float(store.manifest(version)["created_at"]) - publish_started_wall
    while retriever.version != version and time.perf_counter() - publish_started < 120:
        time.sleep(0.005)
    swapped = time.perf_counter()
    writer.wait(timeout=120)
    time.sleep(3.0)
    stop.set()
    reader.join()
    steady = [s for t, s, v in latencies if t < publish_started]
    during = [s for t, s, v in latencies if publish_started <= t <= swapped + 1.0]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1000 if len(xs) > 2 else float("nan")  # noqa: E731
    return {"from_version": before_version, "to_version": version, "changed_documents": 100,
            "writer_process_s": published - publish_started, "swap_after_publish_s": swapped - published,
            "queries": len(latencies), "failed": len(errors), "steady_p50_ms": q(steady, 50),
            "steady_p99_ms": q(steady, 99), "during_p50_ms": q(during, 50), "during_p99_ms": q(during, 99),
            "served_versions": sorted({v for _, _, v in latencies})}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([r["mode"] for r in rows], [r["chunks_per_s"] for r in rows], color=["#888", "#4a7", "#2a5"])
    ax.set_xlabel("chunks embedded and published per second")
    ax.set_title("Knowledge-base ingestion into a snapshot (2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--foldoc-entries", type=int, default=1500)
    args = parser.parse_args(argv)
    import ray

    docs = corpus(args.foldoc_entries)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aiflow-bench-kb-") as tmp:
        for i, actors in enumerate((None, 1, 2)):
            log.info("ingesting %d documents (%s)", len(docs), actors or "one process")
            rows.append(ingest_once(docs, Path(tmp) / f"kb{i}", actors))
        swap_result = swap(Path(tmp) / "kb2", docs)
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kb_ingest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.out / "kb_ingest.png")
    base = rows[0]["chunks_per_s"]
    lines = ["# Knowledge-base ingestion and the snapshot swap", "",
             f"Reproduce: `make bench-kb` ({len(docs)} documents: the pydoc corpus and the first "
             f"{args.foldoc_entries} FOLDOC entries; all-MiniLM-L6-v2 on CPU; one run, side by side).", "",
             "| mode | chunks | embed s | publish s | total s | chunks/s | vs one process |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['chunks']} | {r['embed_s']:.1f} | {r['publish_s']:.2f} | {r['total_s']:.1f} | "
              f"{r['chunks_per_s']:.0f} | {r['chunks_per_s'] / base:.2f}x |" for r in rows]
    s = swap_result
    lines += ["", f"Snapshot of {rows[-1]['size_bytes'] / 1e6:.1f} MB. A retriever serving it (refresh every 0.1 s), "
              f"queried without pause by one thread, while a writer process (`aiflow kb --snapshots ingest`, embedder "
             f"load included) changed {s['changed_documents']} documents:",
              "", "| writer process s | swap after publish s | queries | failed | p50 ms steady | p99 ms steady | "
              "p50 ms during | p99 ms during |", "|---|---|---|---|---|---|---|---|",
              f"| {s['writer_process_s']:.2f} | {s['swap_after_publish_s']:.2f} | {s['queries']} | {s['failed']} | "
              f"{s['steady_p50_ms']:.1f} | {s['steady_p99_ms']:.1f} | {s['during_p50_ms']:.1f} | "
              f"{s['during_p99_ms']:.1f} |", "", "```json", json.dumps(s, indent=2), "```", ""]
    (args.out / "kb_ingest.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
