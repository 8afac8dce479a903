"""TPOT through the Ray Serve cluster vs the same loop in-process, and vs server-only, per bandwidth.

    make run                                   # the local cluster with the real pair
    python -m aiflow_ray.bench.serve_overhead  # writes docs/benchmarks/serve_overhead.{csv,md}

Both modes use the real-time link emulator at the same bandwidth and RTT, the same fixed draft
length and the same prompts, interleaved per prompt. Serve overhead = TPOT(serve) / TPOT(in-process) - 1.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.client import AiflowClient
from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig
from aiflow_ray.data import load_prompts
from aiflow_ray.network.link import PRESETS_BPS
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps


def _add_parts(parts: dict[str, list[float]], trace: dict[str, Any]) -> None:
    rounds = max(int(trace["rounds"]), 1)
    for key in parts:
        parts[key].append(float(trace[key]) / rounds)


def main(argv: list[str] | None = None) -> None:
    from aiflow_ray.tiers.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--bandwidths", default=",".join(format_bandwidth(b) for b in PRESETS_BPS.values()))
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    client = AiflowClient(args.url)
    pipeline = Pipeline.load(ModelPairConfig())
    rows: list[dict[str, Any]] = []
    prompts = load_prompts(args.prompts)
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    bar = tqdm(total=len(bandwidths) * len(prompts) * 3, desc="serve overhead", unit="run")
    for bw in bandwidths:
        client.set_link("bench", bw, args.rtt_ms)
        samples: dict[str, list[float]] = {"in-process": [], "serve": [], "server-only": []}
        # Where the time goes per round, to tell Serve's call overhead from slower compute in replicas.
        parts: dict[str, dict[str, list[float]]] = {m: {"draft_s": [], "verify_s": [], "link_s": []}
                                                    for m in ("in-process", "serve")}
        for prompt in prompts:
            link = LinkConfig(bandwidth_bps=bw, rtt_s=args.rtt_ms / 1000)
            opts = GenerateOptions(prompt=prompt["prompt"], draft_len=args.draft_len,
                                   max_new_tokens=args.max_new_tokens, link=link)
            local = pipeline.run(opts).trace
            samples["in-process"].append(local.tpot_s)
            _add_parts(parts["in-process"], local.to_dict())
            bar.update(1)
            for mode, path in (("serve", "device-edge"), ("server-only", "server-only")):
                body = client.generate(prompt=prompt["prompt"], path=path, draft_len=args.draft_len,
                                       max_tokens=args.max_new_tokens, link_id="bench")
                samples[mode].append(body["trace"]["tpot_s"])
                if mode == "serve":
                    _add_parts(parts["serve"], body["trace"])
                bar.update(1)
        for mode, values in samples.items():
            row: dict[str, Any] = {"bandwidth_bps": bw, "mode": mode, "tpot_s": statistics.median(values),
                                   "num_prompts": len(values)}
            for key in ("draft_s", "verify_s", "link_s"):
                per_round = parts.get(mode, {}).get(key)
                row[f"{key}_per_round"] = statistics.median(per_round) if per_round else ""
            rows.append(row)
    bar.close()
    out = Path(args.out)
    write_csv(out / "serve_overhead.csv", rows)
    lines = ["# Ray Serve overhead on the device-edge path", "",
             f"Reproduce: `make run && python -m aiflow_ray.bench.serve_overhead --prompts {args.prompts} "
             f"--draft-len {args.draft_len}`", "",
             "| bandwidth | in-process TPOT | serve TPOT | overhead | server-only TPOT | serve / server-only |",
             "|---|---|---|---|---|---|"]
    for bw in bandwidths:
        by = {r["mode"]: float(r["tpot_s"]) for r in rows if r["bandwidth_bps"] == bw}
        lines.append(f"| {format_bandwidth(bw)} | {by['in-process'] * 1e3:.1f} ms | {by['serve'] * 1e3:.1f} ms | "
                     f"{by['serve'] / by['in-process'] - 1:+.1%} | {by['server-only'] * 1e3:.1f} ms | "
                     f"{by['serve'] / by['server-only']:.3f}x |")
    lines += ["", "Per round (median over prompts): device draft, edge verify (as the edge timed it), and the rest "
              "of the round trip (emulated link plus, through Serve, the handle call):", "",
              "| bandwidth | mode | draft | verify | link + calls |", "|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] != "server-only":
            ms = {k: r[f"{k}_per_round"] * 1e3 for k in ("draft_s", "verify_s", "link_s")}
            lines.append(f"| {format_bandwidth(r['bandwidth_bps'])} | {r['mode']} | {ms['draft_s']:.1f} ms | "
                         f"{ms['verify_s']:.1f} ms | {ms['link_s']:.1f} ms |")
    (out / "serve_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
