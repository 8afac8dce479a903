"""The router's predictions against what the requests measured, per engine pair, path and link bandwidth.

    make run
    python -m aiflow_ray.bench.predictions   # writes docs/benchmarks/router.{csv,md,png}; restores the profile

For each drafter/verifier engine pair (hf/hf, llama_cpp/hf, llama_cpp/llama_cpp) the bench deploys the local
profile with those engines and streams the same prompts through the API on every path (on-device,
server-only, device-edge, auto) over emulated links of three bandwidths. Each response's ``route`` carries
the router's predicted TTFT and TPOT for the path it chose; its ``trace`` carries what the device measured
for that request, which is what the router records beside the prediction (``/v1/router``'s
``prediction_error``). The table shows the medians and measured / predicted; 1.00x is a perfect prediction.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.bench.served import PAIRS, _deploy, _prompts, pair_sweep_parser
from aiflow_ray.client import AiflowClient
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps

PATHS = ("on-device", "server-only", "device-edge", "auto")
FIELDS = ["pair", "bandwidth_bps", "requested_path", "path", "kind", "draft_len", "predicted_ttft_s",
          "measured_ttft_s", "predicted_tpot_s", "measured_tpot_s", "client_ttft_s", "client_tpot_s", "error"]


def _request(client: AiflowClient, prompt: str, max_tokens: int, **body: Any) -> dict[str, Any]:
    arrivals: list[tuple[float, int]] = []
    done: dict[str, Any] = {}
    sent = time.perf_counter()
    for at, event in client.stream_generate(prompt=prompt, max_tokens=max_tokens, ignore_eos=True, **body):
        if event.get("done"):
            done = event
        elif event.get("token_ids"):
            arrivals.append((at, len(event["token_ids"])))
    route, trace = done["route"], done["trace"]
    after_first = sum(n for _, n in arrivals) - arrivals[0][1]
    return {"path": trace["path"], "draft_len": route.get("draft_len"),
            "predicted_ttft_s": route.get("predicted_ttft_s"), "predicted_tpot_s": route.get("predicted_tpot_s"),
            "measured_ttft_s": trace["ttft_s"], "measured_tpot_s": trace["tpot_s"],
            "client_ttft_s": arrivals[0][0] - sent,
            "client_tpot_s": (arrivals[-1][0] - arrivals[0][0]) / max(after_first, 1)}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    client = AiflowClient(args.url)
    prompts = _prompts(args.prompts_per_kind)
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    pairs = args.pairs.split(",")
    bar = tqdm(total=len(pairs) * len(bandwidths) * len(prompts) * len(PATHS), desc="predicted vs measured",
               unit="request")
    rows: list[dict[str, Any]] = []
    errors: dict[str, Any] = {}
    for pair in pairs:
        bar.set_postfix_str(f"deploying {pair}")
        _deploy(pair)
        for bw in bandwidths:
            client.set_link(f"bench-{int(bw)}", bw, args.rtt_ms)
        # One request per path and link first: the router learns each link and path from its own traffic.
        for bw in bandwidths:
            for path in PATHS:
                _request(client, "warm up", 8, path=path, link_id=f"bench-{int(bw)}")
        bar.set_postfix_str(pair)
        for bw in bandwidths:
            for prompt in prompts:
                for path in PATHS:
                    # Numbered first, so no request finds its prompt in a tier's prefix cache: the router
                    # predicts a whole prefill (a repeated prompt's first token came 5-15x sooner than predicted).
                    text = f"({len(rows) + 1}) {prompt['prompt']}"
                    try:
                        out = _request(client, text, args.max_new_tokens, path=path, link_id=f"bench-{int(bw)}")
                    except Exception as exc:  # one failed request is a row that says so, not a lost run
                        out = {"path": "", "error": f"{type(exc).__name__}: {exc}"[:200]}
                    rows.append({"pair": pair, "bandwidth_bps": bw, "requested_path": path, "kind": prompt["kind"],
                                 **out})
                    bar.update(1)
        errors[pair] = client.router().get("prediction_error", {})
    bar.close()
    _deploy(None)
    return rows, errors


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _ratio(measured: float | None, predicted: float | None) -> str:
    return "-" if measured is None or not predicted else f"{measured / predicted:.2f}x"


def report(rows: list[dict[str, Any]], errors: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# The router's predictions against measured TTFT and TPOT", "",
             f"Reproduce: `make run && python -m aiflow_ray.bench.predictions --pairs {args.pairs} "
             f"--prompts-per-kind {args.prompts_per_kind} --max-new-tokens {args.max_new_tokens}` (local profile, "
             "default models; "
             f"{args.max_new_tokens} tokens, greedy, streamed, EOS ignored; RTT {args.rtt_ms:g} ms; medians over "
             f"{2 * args.prompts_per_kind} prompts, half code, half English, each request's numbered so that no tier "
             "finds it in its prefix cache, after one warm-up request per path and link).", "",
             "Predicted: the router's TTFT and TPOT for the path it chose (`route.predicted_ttft_s`, "
             "`route.predicted_tpot_s` in each response). Measured: the request's own trace, as the router "
             "records it beside the prediction. measured / predicted: 1.00x is exact; above 1, slower than "
             "predicted.", "",
             "| drafter/verifier | requested path | bandwidth | chosen | predicted TTFT | measured TTFT | ratio "
             "| predicted TPOT | measured TPOT | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    seen: list[tuple[str, str, float]] = []
    for r in rows:
        key = (r["pair"], r["requested_path"], float(r["bandwidth_bps"]))
        if key not in seen:
            seen.append(key)
    for pair, path, bw in seen:
        group = [r for r in rows if (r["pair"], r["requested_path"], float(r["bandwidth_bps"])) == (pair, path, bw)
                 and not r.get("error")]
        chosen = "/".join(sorted({str(r["path"]) for r in group})) or "failed"
        med = {f: _median([float(r[f]) for r in group if r.get(f) not in (None, "")]) for f in FIELDS[6:10]}
        lines.append(f"| {pair} | {path} | {format_bandwidth(bw)} | {chosen} | {_ms(med['predicted_ttft_s'])} "
                     f"| {_ms(med['measured_ttft_s'])} | {_ratio(med['measured_ttft_s'], med['predicted_ttft_s'])} "
                     f"| {_ms(med['predicted_tpot_s'])} | {_ms(med['measured_tpot_s'])} "
                     f"| {_ratio(med['measured_tpot_s'], med['predicted_tpot_s'])} |")
    if errors:
        lines += ["", "## The router's own view at the end of each pair's run", "",
                  "`GET /v1/router` → `prediction_error`: per path, the median of measured / predicted - 1 over its "
                  "last requests (warm-ups included).", "",
                  "| drafter/verifier | path | requests | TTFT error | TPOT error |", "|---|---|---|---|---|"]
        for pair, per_path in errors.items():
            for path, e in sorted(per_path.items()):
                tpot = "-" if e.get("tpot_error_median") is None else f"{e['tpot_error_median']:+.2f}"
                lines.append(f"| {pair} | {path} | {e['requests']} | {e['ttft_error_median']:+.2f} | {tpot} |")
    lines += ["", "![predicted vs measured](router.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    markers = dict(zip(PAIRS, ("o", "s", "^"), strict=True))
    colors = dict(zip(PATHS, ("tab:green", "tab:blue", "tab:orange", "tab:purple"), strict=True))
    for ax, what in zip(axes, ("ttft", "tpot"), strict=True):
        values: list[float] = []
        for r in rows:
            p, m = r.get(f"predicted_{what}_s"), r.get(f"measured_{what}_s")
            if p in (None, "") or m in (None, "") or float(p) <= 0 or float(m) <= 0:
                continue
            values += [float(p) * 1e3, float(m) * 1e3]
            ax.scatter(float(p) * 1e3, float(m) * 1e3, marker=markers.get(r["pair"], "x"),
                       color=colors.get(r["requested_path"], "grey"), alpha=0.7, s=28)
        if values:
            lo, hi = min(values) / 1.5, max(values) * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted {what.upper()} (ms)")
        ax.set_ylabel(f"measured {what.upper()} (ms)")
        ax.set_title(what.upper())
    handles = [plt.Line2D([], [], ls="", marker=m, color="grey", label=p) for p, m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=f"requested {p}") for p, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "router.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import json

    args = pair_sweep_parser(__doc__, 1, 32, "router.csv").parse_args(argv)
    out = Path(args.out)
    errors_file = out / "router_errors.json"
    if args.report_only:
        with (out / "router.csv").open() as handle:
            rows: list[dict[str, Any]] = list(csv.DictReader(handle))
        errors = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    else:
        rows, errors = run(args)
        write_csv(out / "router.csv", rows, FIELDS)
        errors_file.write_text(json.dumps(errors, indent=1) + "\n")
    (out / "router.md").write_text(report(rows, errors, args))
    plot(rows, out)
    print((out / "router.md").read_text())


if __name__ == "__main__":
    main()
