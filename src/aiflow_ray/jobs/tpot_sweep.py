"""TPOT sweep against the running cluster: server-only, fixed draft lengths and adaptive, per bandwidth.

    ray job submit --address http://127.0.0.1:8265 -- \\
        python -m aiflow_ray.jobs.tpot_sweep --draft-lens 1-6,8 --output /tmp/sweep

Every request goes through the HTTP API and the Serve deployments; the emulated link of link id
``--link-id`` is set through the admin API before each bandwidth. Modes run interleaved per prompt,
so slow drift of the machine hits them alike. Writes ``tpot_sweep.csv`` (one row per request) and
``summary.json`` (median TPOT per bandwidth and mode, and its ratio to server-only), and prints the
summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.client import AiflowClient
from aiflow_ray.data import load_prompts
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps, parse_int_ranges

FIELDS = ["bandwidth_bps", "mode", "draft_len", "prompt_id", "tpot_s", "ttft_s", "num_tokens", "acceptance_rate",
          "bytes_up", "bytes_down"]


def run(client: AiflowClient, prompts: list[dict[str, str]], bandwidths_bps: list[float], draft_lens: list[int],
        max_tokens: int, rtt_ms: float, link_id: str, output: Path) -> dict[str, Any]:
    modes: list[tuple[str, dict[str, Any]]] = [("server-only", {"path": "server-only"})]
    modes += [(f"k={k}", {"path": "device-edge", "draft_len": k}) for k in draft_lens]
    modes.append(("adaptive", {"path": "device-edge", "draft_len": "auto"}))
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(bandwidths_bps) * len(prompts) * len(modes), desc="tpot sweep", unit="request",
               file=sys.stdout)
    with (output / "tpot_sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for bw in bandwidths_bps:
            client.set_link(link_id, bw, rtt_ms)
            for index, prompt in enumerate(prompts):
                for mode, options in modes:
                    body = client.generate(prompt=prompt["prompt"], max_tokens=max_tokens, link_id=link_id,
                                           quality="exact", **options)
                    trace = body["trace"]
                    row = {"bandwidth_bps": bw, "mode": mode, "draft_len": options.get("draft_len", 0),
                           "prompt_id": prompt.get("id", index), "tpot_s": trace["tpot_s"],
                           "ttft_s": trace["ttft_s"], "num_tokens": len(body["token_ids"]),
                           "acceptance_rate": trace.get("acceptance_rate"), "bytes_up": trace.get("bytes_up"),
                           "bytes_down": trace.get("bytes_down")}
                    writer.writerow(row)
                    rows.append(row)
                    bar.update(1)
    bar.close()
    summary: dict[str, Any] = {"max_tokens": max_tokens, "rtt_ms": rtt_ms, "prompts": len(prompts), "bandwidths": {}}
    for bw in bandwidths_bps:
        medians = {mode: statistics.median(r["tpot_s"] for r in rows if r["bandwidth_bps"] == bw and r["mode"] == mode)
                   for mode, _ in modes}
        base = medians["server-only"]
        summary["bandwidths"][format_bandwidth(bw)] = {
            mode: {"median_tpot_s": value, "ratio_vs_server_only": value / base if base > 0 else None}
            for mode, value in medians.items()
        }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--output", type=Path, required=True, help="directory for tpot_sweep.csv and summary.json")
    parser.add_argument("--prompts", type=int, default=6, help="how many of the bundled prompts")
    parser.add_argument("--draft-lens", default="1-6,8", help="e.g. 1-6,8,12")
    parser.add_argument("--bandwidths", default="500KB/s,1MB/s,2MB/s")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--link-id", default="sweep")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",") if b.strip()]
    summary = run(AiflowClient(args.url), load_prompts(args.prompts), bandwidths, parse_int_ranges(args.draft_lens),
                  args.max_tokens, args.rtt_ms, args.link_id, args.output)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
