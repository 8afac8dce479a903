"""Grounded answers through the cluster vs shipping the raw documents to the device.

    make run && python -m aiflow_ray.bench.grounded     # writes docs/benchmarks/grounded.{csv,md}

For each question of the retrieval evaluation set (a sample), at each device-link bandwidth:
- ``grounded-beam``: POST /v1/generate with quality grounded: the question goes up to the cloud,
  which retrieves and answers with beam search; the answer comes down.
- ``grounded-beam-embedding``: as grounded-beam, but the device embeds the question and sends the
  768-byte embedding instead of the text.
- ``grounded-speculative``: the cloud retrieves, the chunks come down, device and edge decode.
- ``raw-documents``: no retrieval service: the whole documents behind the same sources (the
  corpus entries, not the chunks) are shipped to the device (through the edge), and the device's
  model answers with them in its prompt (as much of them as a grounded prompt holds).
  The transfer is computed from the emulated links' settings (RTT + bytes / bandwidth per link, as
  the emulator would delay it); the on-device answer is timed through the cluster.
Every mode generates the same number of tokens; latency is end to end as the device sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.client import AiflowClient
from aiflow_ray.config.app import AppArgs
from aiflow_ray.data import load_retrieval_eval
from aiflow_ray.rag import corpora
from aiflow_ray.rag.prompting import MAX_CONTEXT_CHARS, grounded_messages
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps


def raw_documents() -> dict[str, str]:
    """source -> the document's full text, from the demo corpora the knowledge base was built from."""
    out: dict[str, str] = {}
    for name in corpora.CORPORA:
        for line in corpora.fetch(name).read_text().splitlines():
            item = json.loads(line)
            out[item["source"]] = item["text"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--bandwidths", default="500KB/s,2MB/s")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    client = AiflowClient(args.url)
    documents = raw_documents()
    cloud_link = AppArgs().edge_cloud_link
    evaluation = load_retrieval_eval()
    step = max(len(evaluation) // args.questions, 1)
    questions = [item["query"] for item in evaluation[::step][: args.questions]]
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(bandwidths) * len(questions) * 4, desc="grounded bench", unit="request", file=sys.stdout)
    for bw in bandwidths:
        client.set_link("kb-bench", bw, args.rtt_ms)
        for question in questions:
            common = {"prompt": question, "quality": "grounded", "retrieval_top_k": args.top_k,
                      "max_tokens": args.max_tokens, "link_id": "kb-bench"}
            beam = client.generate(**common, generation="beam", beam_width=2)
            bar.update(1)
            embedded = client.generate(**common, generation="beam", beam_width=2, query_encoding="embedding")
            bar.update(1)
            spec = client.generate(**common, generation="speculative", draft_len=4)
            bar.update(1)
            for mode, body in (("grounded-beam", beam), ("grounded-beam-embedding", embedded),
                               ("grounded-speculative", spec)):
                trace = body["trace"]
                rows.append({"bandwidth_bps": bw, "mode": mode, "question": question, "e2e_s": trace["total_s"],
                             "device_link_bytes": trace["links"]["device-edge"]["bytes_up"]
                             + trace["links"]["device-edge"]["bytes_down"],
                             "edge_cloud_link_bytes": trace["links"]["edge-cloud"]["bytes_up"]
                             + trace["links"]["edge-cloud"]["bytes_down"],
                             "num_tokens": len(body["token_ids"])})
            docs = [{"source": h["source"], "text": documents[h["source"]]} for h in beam["sources"]]
            raw_bytes = sum(len(d["text"].encode()) for d in docs)
            query_bytes = len(question.encode()) + 8
            transfer_s = (args.rtt_ms / 1e3 + (query_bytes + raw_bytes) / bw
                          + cloud_link.rtt_s + (query_bytes + raw_bytes) / cloud_link.bandwidth_bps)
            # The device reads as much context as a grounded prompt holds; all the bytes still had to come.
            messages, _ = grounded_messages(question, [{**d, "text": d["text"][:MAX_CONTEXT_CHARS]} for d in docs])
            local = client.generate(prompt=messages[1]["content"], path="on-device", quality="fast",
                                    max_tokens=args.max_tokens, link_id="kb-bench")
            bar.update(1)
            rows.append({"bandwidth_bps": bw, "mode": "raw-documents", "question": question,
                         "e2e_s": transfer_s + local["trace"]["total_s"],
                         "device_link_bytes": query_bytes + raw_bytes,
                         "edge_cloud_link_bytes": query_bytes + raw_bytes, "num_tokens": len(local["token_ids"])})
    bar.close()
    write_csv(args.out / "grounded.csv", rows)
    lines = ["# Grounded answers vs raw documents on the device", "",
             f"Reproduce: `make run && python -m aiflow_ray.bench.grounded --questions {args.questions} "
             f"--bandwidths {args.bandwidths}` ({len(questions)} questions, top-{args.top_k} chunks, "
             f"{args.max_tokens} tokens, device RTT {args.rtt_ms:g} ms).", "",
             "| device link | mode | median e2e | median bytes on device link | median bytes on edge-cloud link |",
             "|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for bw in bandwidths:
        for mode in ("grounded-beam", "grounded-beam-embedding", "grounded-speculative", "raw-documents"):
            sel = [r for r in rows if r["bandwidth_bps"] == bw and r["mode"] == mode]
            med = {k: statistics.median(r[k] for r in sel) for k in ("e2e_s", "device_link_bytes",
                                                                     "edge_cloud_link_bytes")}
            summary.setdefault(format_bandwidth(bw), {})[mode] = med
            lines.append(f"| {format_bandwidth(bw)} | {mode} | {med['e2e_s']:.2f} s | "
                         f"{med['device_link_bytes']:,.0f} | {med['edge_cloud_link_bytes']:,.0f} |")
    (args.out / "grounded.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "grounded.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
