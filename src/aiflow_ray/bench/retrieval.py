"""Retrieval quality and speed on the demo corpora: recall@5, MRR and query latency, exact vs HNSW.

    python -m aiflow_ray.bench.retrieval          # writes docs/benchmarks/retrieval.{json,md}

Fetches and ingests the demo corpora (pydoc topics and FOLDOC) into the knowledge base if needed,
then runs every query of ``data/retrieval_eval.jsonl`` (written for these corpora, each with
the source entries that answer it). A query counts as recalled at 5 when any expected source is
among the top five hits; MRR uses the rank of the first expected source in the top ten. Latency is
per query, embedding included (the part a client waits for), with the search alone reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from aiflow_ray import envs
from aiflow_ray.data import load_retrieval_eval
from aiflow_ray.rag import corpora
from aiflow_ray.rag.embedder import Embedder
from aiflow_ray.rag.retriever import Retriever
from aiflow_ray.rag.store import KnowledgeBase, read_documents


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def evaluate(retriever: Retriever, queries: list[dict[str, Any]], vectors: np.ndarray, mode: str) -> dict[str, Any]:
    recalled, reciprocal = 0, 0.0
    search_ms: list[float] = []
    by_corpus: dict[str, dict[str, int]] = {}
    misses = []
    for item, vector in zip(queries, vectors, strict=True):
        started = time.perf_counter()
        hits = retriever.search(item["query"], top_k=10, query_vector=vector, mode=mode)
        search_ms.append((time.perf_counter() - started) * 1e3)
        sources = [h.source for h in hits]
        expected = set(item["expected"])
        rank = next((i + 1 for i, s in enumerate(sources) if s in expected), None)
        hit5 = rank is not None and rank <= 5
        recalled += hit5
        reciprocal += 1.0 / rank if rank else 0.0
        corpus = by_corpus.setdefault(item["corpus"], {"queries": 0, "recalled_at_5": 0})
        corpus["queries"] += 1
        corpus["recalled_at_5"] += hit5
        if not hit5:
            misses.append({"query": item["query"], "expected": item["expected"], "got": sources[:5]})
    n = len(queries)
    return {
        "recall_at_5": recalled / n, "mrr": reciprocal / n,
        "search_p50_ms": _percentile(search_ms, 50), "search_p99_ms": _percentile(search_ms, 99),
        "by_corpus": {k: {**v, "recall_at_5": v["recalled_at_5"] / v["queries"]} for k, v in by_corpus.items()},
        "misses": misses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb", type=Path, default=None, help="knowledge base file (default: AIFLOW_KB_PATH)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the queries")
    args = parser.parse_args(argv)
    kb = KnowledgeBase(args.kb or envs.kb_path())
    embedder = Embedder()
    documents = [doc for name in corpora.CORPORA for doc in read_documents(corpora.fetch(name))]
    started = time.perf_counter()
    ingest = kb.ingest(documents, embedder, progress=True)
    ingest_s = time.perf_counter() - started
    queries = load_retrieval_eval()
    # End-to-end query latency: embedding plus exact hybrid search, one query at a time as a client sends them.
    retriever = Retriever(kb, embedder, "exact")
    e2e_ms = []
    for _ in tqdm(range(args.repeats), desc="timed passes", unit="pass"):
        for item in queries:
            t0 = time.perf_counter()
            retriever.search(item["query"], top_k=5)
            e2e_ms.append((time.perf_counter() - t0) * 1e3)
    vectors = embedder.embed([q["query"] for q in queries])
    results: dict[str, Any] = {}
    for kind in ("exact", "hnsw"):
        t0 = time.perf_counter()
        candidate = Retriever(kb, embedder, kind)
        build_s = time.perf_counter() - t0
        for mode in ("hybrid", "dense"):
            runs = [evaluate(candidate, queries, vectors, mode) for _ in range(args.repeats)]
            best = runs[0]
            best["search_p50_ms"] = statistics.median(r["search_p50_ms"] for r in runs)
            best["search_p99_ms"] = statistics.median(r["search_p99_ms"] for r in runs)
            best["index_build_s"] = build_s
            results[f"{kind}-{mode}"] = best
    stats = kb.stats()
    chosen = results["exact-hybrid"]
    summary = {
        "embedder": embedder.name, "index": "exact", "retrieval": "hybrid (dense + BM25, reciprocal rank fusion)",
        "num_queries": len(queries), "num_chunks": stats["chunks"], "num_documents": stats["documents"],
        "recall_at_5": chosen["recall_at_5"], "mrr": chosen["mrr"],
        "query_p50_ms": _percentile(e2e_ms, 50), "query_p99_ms": _percentile(e2e_ms, 99),
        "search_p50_ms": chosen["search_p50_ms"], "search_p99_ms": chosen["search_p99_ms"],
        "ingest_s": ingest_s, "ingest": ingest.__dict__, "variants": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Retrieval on the demo corpora", "",
        "Reproduce: `python -m aiflow_ray.bench.retrieval` (fetches and ingests the corpora if needed).", "",
        f"{summary['num_documents']} documents, {summary['num_chunks']} chunks (Python documentation topics and "
        f"FOLDOC), {embedder.name} embeddings, {len(queries)} queries from `data/retrieval_eval.jsonl` "
        "(written for these corpora; a query is recalled at 5 when one of its expected entries is in the top "
        "five hits; hits are one per source).", "",
        "| index | ranking | recall@5 | MRR@10 | search p50 | search p99 | index build |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        kind, mode = name.split("-")
        lines.append(f"| {kind} | {mode} | {r['recall_at_5']:.3f} | {r['mrr']:.3f} | {r['search_p50_ms']:.2f} ms | "
                     f"{r['search_p99_ms']:.2f} ms | {r['index_build_s']:.2f} s |")
    lines += [
        "", "Search times exclude the query embedding; with it (exact, hybrid, what a client waits for): p50 "
        f"{summary['query_p50_ms']:.1f} ms, p99 {summary['query_p99_ms']:.1f} ms.", "",
        "By corpus (exact, hybrid): " + ", ".join(f"{k} {v['recall_at_5']:.3f} ({v['queries']} queries)"
                                                   for k, v in chosen["by_corpus"].items()) + ".", "",
        "Misses at 5 (exact, hybrid):", "",
    ]
    lines += [f"- {m['query']!r}: expected {m['expected']}, got {m['got']}" for m in chosen["misses"]] or ["- none"]
    (args.out / "retrieval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
