"""Edge capacity through the served cluster: N devices drafting for real, one edge replica.

    make run                                      # the local cluster (llama.cpp on every tier)
    python -m aiflow_ray.bench.capacity_served    # writes docs/benchmarks/capacity_served.{csv,md}; restores it

``bench/capacity.py`` measures an edge engine alone, its devices simulated in-process (drafts made in advance,
their drafting time slept). This bench puts the whole served path under the same load: it deploys the local
profile with one edge replica and one device replica (``--set edge.autoscaling.max_replicas=1`` ...), gives
each of N devices an emulated link of its own (1 MB/s, 20 ms RTT), and sends N requests at once through the
API, each device its own prompt: speculative (``device-edge``, draft length k) and, back to back, the same N
prompts ``server-only``. The device replica drafts every request with its real engine and every round crosses
the emulated link, so the tiers share this host's cores as they would share nothing on real hardware: the
numbers say what this 2-core host serves, not what N phones and an edge server would.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.bench.served import _prompts
from aiflow_ray.client import AiflowClient

MODES = {"speculative": "device-edge", "server-only": "server-only"}
ONE_REPLICA = ("edge", "device")


def _deploy(one_replica: bool) -> None:
    cmd = [str(Path(sys.executable).with_name("aiflow")), "deploy", "--profile", "local"]
    for tier in ONE_REPLICA if one_replica else ():
        cmd += ["--set", f"{tier}.autoscaling.max_replicas=1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _one(client: AiflowClient, prompt: str, path: str, link_id: str, k: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"path": path, "link_id": link_id, "chat": True, "min_tokens": max_tokens}
    if path == "device-edge":
        body["draft_len"] = k
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    ids: list[int] = []
    done: dict[str, Any] = {}
    for at, event in client.stream_generate(prompt=prompt, max_tokens=max_tokens, **body):
        ids += event.get("token_ids") or []
        if event.get("done"):
            done = event
        elif event.get("token_ids"):
            arrivals.append((at, len(event["token_ids"])))
    after_first = sum(n for _, n in arrivals) - arrivals[0][1]
    trace = done["trace"]
    return {"ttft_s": arrivals[0][0] - sent, "tpot_s": (arrivals[-1][0] - arrivals[0][0]) / max(after_first, 1),
            "ended_at": time.perf_counter(), "token_ids": ids, "tokens": len(ids), "path": done["route"]["path"],
            "rounds": trace["rounds"], "accepted": sum(trace["accepted"]), "context_resends": trace["context_resends"]}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]  # nearest rank


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    client = AiflowClient(args.url)
    prompts = [p["prompt"] for p in _prompts(max(args.devices))]
    _deploy(one_replica=True)
    rows: list[dict[str, Any]] = []
    try:
        for i in range(max(args.devices)):
            client.set_link(f"capacity-{i}", args.bandwidth_bps, args.rtt_ms)
        client.generate(prompt="warm up", path="device-edge", max_tokens=8, link_id="capacity-0")
        bar = tqdm(total=len(args.devices) * args.repeats * len(MODES), desc="devices x mode", unit="run")
        for n in args.devices:
            for repeat in range(args.repeats):
                for mode, path in MODES.items():
                    # Numbered at the start: each run's prompts share only the chat template's system turn with
                    # what the engines kept from earlier runs.
                    asked = [f"Device {i}, run {repeat}. {prompts[i]}" for i in range(n)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        futures = [pool.submit(_one, client, asked[i], path, f"capacity-{i}", args.k, args.max_tokens)
                                   for i in range(n)]
                        outs = [f.result() for f in futures]
                    wall_s = max(o["ended_at"] for o in outs) - started
                    rows.append({
                        "devices": n, "repeat": repeat, "mode": mode, "wall_s": round(wall_s, 3),
                        "tokens_per_s": round(sum(o["tokens"] for o in outs) / wall_s, 2),
                        "tpot_p50_ms": round(statistics.median(o["tpot_s"] for o in outs) * 1e3, 1),
                        "tpot_p99_ms": round(_pct([o["tpot_s"] for o in outs], 0.99) * 1e3, 1),
                        "ttft_p50_ms": round(statistics.median(o["ttft_s"] for o in outs) * 1e3, 1),
                        "accepted_per_round": round(sum(o["accepted"] for o in outs)
                                                    / max(sum(o["rounds"] for o in outs), 1), 2),
                        "context_resends": sum(o["context_resends"] for o in outs),
                        "paths": ",".join(sorted({o["path"] for o in outs})),
                        "outputs": [o["token_ids"] for o in outs],
                    })
                    bar.update()
        bar.close()
    finally:
        _deploy(one_replica=False)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> str:
    lines = [
        "# Edge capacity through the served cluster", "",
        f"Reproduce: `make run`, then `python -m aiflow_ray.bench.capacity_served --devices "
        f"{','.join(map(str, args.devices))} --repeats {args.repeats}` ({date.today().isoformat()}; 2 CPU cores, "
        "no GPU; the local profile: llama.cpp Q4_K_M on every tier, Qwen2.5-Coder-0.5B drafting on the device "
        "tier, 1.5B verifying on the edge).", "",
        f"N devices, each its own emulated link ({args.bandwidth_bps / 1e6:g} MB/s, {args.rtt_ms:g} ms RTT) and "
        f"prompt, send at once through the API; greedy, draft length {args.k}, {args.max_tokens} output tokens "
        "each; one edge replica and one device replica (autoscaling capped at 1 for the run). Speculative and "
        "server-only run back to back on the same prompts. Unlike [capacity.md](capacity.md), whose devices are "
        "simulated beside an edge engine called directly, every draft here is made by the device tier's engine "
        "and every round crosses Serve and the link emulator, on the same two cores as the edge: the device "
        "replica drafts for all N devices, one at a time, so N devices here are not N devices' hardware.", "",
        "| N | speculative tok/s | server-only tok/s | spec / server | TPOT p50/p99 spec (ms) | "
        "TPOT p50/p99 server (ms) | TTFT p50 spec / server (ms) | accepted/round | spec outputs = server-only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.devices:
        spec = [r for r in rows if r["devices"] == n and r["mode"] == "speculative"]
        server = [r for r in rows if r["devices"] == n and r["mode"] == "server-only"]

        def med(group: list[dict[str, Any]], key: str) -> float:
            return statistics.median(r[key] for r in group)

        same = sum(a == b for s, v in zip(spec, server, strict=True) for a, b in zip(s["outputs"], v["outputs"],
                                                                                     strict=True))
        lines.append(
            f"| {n} | {med(spec, 'tokens_per_s'):.2f} | {med(server, 'tokens_per_s'):.2f} | "
            f"{med(spec, 'tokens_per_s') / med(server, 'tokens_per_s'):.2f}x | {med(spec, 'tpot_p50_ms'):.0f}/"
            f"{med(spec, 'tpot_p99_ms'):.0f} | {med(server, 'tpot_p50_ms'):.0f}/{med(server, 'tpot_p99_ms'):.0f} | "
            f"{med(spec, 'ttft_p50_ms'):.0f} / {med(server, 'ttft_p50_ms'):.0f} | "
            f"{med(spec, 'accepted_per_round'):.2f} | {same} of {n * args.repeats} |")
    lines += ["", "Medians over the repeats. tok/s: output tokens of all N devices / wall time of the N requests. "
              "TPOT: per request, from the streamed chunks' arrival, p50 and p99 (nearest rank) over the devices. "
              "spec outputs = server-only: requests whose speculative token ids equal the same prompt's "
              "server-only ones (llama.cpp's block verification is not bit-identical to one-token decoding, so "
              "the two may part at a near-tie).", "", "Every run: [capacity_served.csv](capacity_served.csv)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity_served.md").write_text(text)
    write_csv(out / "capacity_served.csv", [{k: v for k, v in r.items() if k != "outputs"} for r in rows])
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--devices", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="draft length")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bandwidth-bps", type=float, default=1e6)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    print(report(run(args), args, args.out))


if __name__ == "__main__":
    main()
