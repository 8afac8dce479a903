"""TPOT through the Ray Serve cluster vs the same loop in-process, and vs server-only, per bandwidth.

    make run                                   # the local cluster with the real pair
    python -m aiflow_ray.bench.serve_overhead  # writes docs/benchmarks/serve_overhead.{csv,md}

Both modes use the real-time link emulator at the same bandwidth and RTT, the same fixed draft
length and the same prompts, interleaved per prompt. Serve overhead = TPOT(serve) / TPOT(in-process) - 1.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench.tpot import load_prompts
from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig
from aiflow_ray.jobs.client import AiflowClient
from aiflow_ray.network.link import PRESETS_BPS
from aiflow_ray.units import format_bandwidth


def main(argv: list[str] | None = None) -> None:
    from aiflow_ray.tiers.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    client = AiflowClient(args.url)
    pipeline = Pipeline.load(ModelPairConfig())
    rows: list[dict[str, Any]] = []
    prompts = load_prompts(args.prompts)
    bar = tqdm(total=len(PRESETS_BPS) * len(prompts) * 3, desc="serve overhead", unit="run")
    for bw in PRESETS_BPS.values():
        client.set_link("bench", bw, args.rtt_ms)
        samples: dict[str, list[float]] = {"in-process": [], "serve": [], "server-only": []}
        for prompt in prompts:
            link = LinkConfig(bandwidth_bps=bw, rtt_s=args.rtt_ms / 1000)
            opts = GenerateOptions(prompt=prompt["prompt"], draft_len=args.draft_len,
                                   max_new_tokens=args.max_new_tokens, link=link)
            samples["in-process"].append(pipeline.run(opts).trace.tpot_s)
            bar.update(1)
            for mode, path in (("serve", "device-edge"), ("server-only", "server-only")):
                body = client.generate(prompt=prompt["prompt"], path=path, draft_len=args.draft_len,
                                       max_tokens=args.max_new_tokens, link_id="bench")
                samples[mode].append(body["trace"]["tpot_s"])
                bar.update(1)
        for mode, values in samples.items():
            rows.append({"bandwidth_bps": bw, "mode": mode, "tpot_s": statistics.median(values),
                         "num_prompts": len(values)})
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "serve_overhead.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Ray Serve overhead on the device-edge path", "",
             f"Reproduce: `make run && python -m aiflow_ray.bench.serve_overhead --prompts {args.prompts} "
             f"--draft-len {args.draft_len}`", "",
             "| bandwidth | in-process TPOT | serve TPOT | overhead | server-only TPOT | serve / server-only |",
             "|---|---|---|---|---|---|"]
    for bw in PRESETS_BPS.values():
        by = {r["mode"]: float(r["tpot_s"]) for r in rows if r["bandwidth_bps"] == bw}
        lines.append(f"| {format_bandwidth(bw)} | {by['in-process'] * 1e3:.1f} ms | {by['serve'] * 1e3:.1f} ms | "
                     f"{by['serve'] / by['in-process'] - 1:+.1%} | {by['server-only'] * 1e3:.1f} ms | "
                     f"{by['serve'] / by['server-only']:.3f}x |")
    (out / "serve_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
