"""Re-deciding device-edge requests at a round boundary (``tiers/device.py``, ``PathSwitch``), measured.

    python -m aiflow_ray.bench.path_switch            # the real Qwen pair on HF, code and prose prompts
    python -m aiflow_ray.bench.path_switch --prompts-per-kind 2 --max-new-tokens 32 --links 2MB/s@20   # smoke

Per prompt, in one process and interleaved (so the machine's drift hits every method alike): server-only,
device-edge as decided (no re-decision), and device-edge with the switch armed at server-only's TPOT as the
router would predict it (the median TPOT of server-only requests on warm-up prompts, measured first). The
link is emulated on a virtual clock: compute is timed for real. Each method's time per output token end to
end ((TTFT + decode) / tokens), the tokens before a switch, and whether the output equals server-only's go to
``path_switch.{csv,md,png}``. A request whose rounds are slower than server-only should come out near
server-only's time; one whose rounds are faster should not switch and lose nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.bench.served import _prompts
from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig
from aiflow_ray.data import load_prompts
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps

log = get_logger("bench.path_switch")

METHODS = ("server-only", "device-edge", "device-edge+switch")
FIELDS = ["link", "prompt_id", "kind", "method", "s_per_token", "ttft_s", "tpot_s", "tokens", "rounds", "acceptance",
          "switched_at", "same_as_server_only"]


def _run(pipeline: Pipeline, prompt: str, method: str, link: LinkConfig, max_new: int, draft_len: int,
         switch_tpot_s: float | None) -> dict[str, Any]:
    path = "server-only" if method == "server-only" else "device-edge"
    opts = GenerateOptions(prompt=prompt, path=path, draft_len=draft_len, max_new_tokens=max_new, link=link,
                           min_tokens=max_new, switch_tpot_s=switch_tpot_s if method.endswith("switch") else None)
    result = pipeline.run(opts)
    trace = result.trace
    return {"method": method, "s_per_token": trace.total_s / max(trace.num_tokens, 1), "ttft_s": trace.ttft_s,
            "tpot_s": trace.tpot_s, "tokens": trace.num_tokens, "rounds": trace.rounds,
            "acceptance": trace.acceptance_rate if path == "device-edge" else None,
            "switched_at": trace.switched_at, "token_ids": result.token_ids}


def _links(spec: str) -> list[LinkConfig]:
    """'500KB/s@80,2MB/s@20': bandwidth @ RTT in ms."""
    links = []
    for item in spec.split(","):
        bandwidth, _, rtt_ms = item.partition("@")
        links.append(LinkConfig(bandwidth_bps=parse_bandwidth_bps(bandwidth), rtt_s=float(rtt_ms or 20) / 1e3,
                                virtual_time=True))
    return links


def _link_name(link: LinkConfig) -> str:
    return f"{format_bandwidth(link.bandwidth_bps)}, RTT {1e3 * link.rtt_s:g} ms"


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    log.info("loading the pair (%s)", args.dtype)
    pipeline = Pipeline.load(ModelPairConfig(dtype=args.dtype))
    prompts = _prompts(args.prompts_per_kind)
    warmups = [p for p in load_prompts() if p not in prompts][:2]
    rows: list[dict[str, Any]] = []
    thresholds: dict[str, float] = {}
    for link in _links(args.links):
        name = _link_name(link)
        # What the router would predict for server-only: its decode cost as measured on this pair and link.
        measured = [_run(pipeline, p["prompt"], "server-only", link, args.max_new_tokens, args.draft_len,
                         None)["tpot_s"] for p in tqdm(warmups, desc=f"{name}: server-only TPOT", unit="request")]
        thresholds[name] = switch_tpot_s = statistics.median(measured)
        log.info("%s: server-only TPOT %.1f ms, the switch's threshold", name, 1e3 * switch_tpot_s)
        for prompt in tqdm(prompts, desc=f"{name}: prompts x methods", unit="prompt"):
            results = {m: _run(pipeline, prompt["prompt"], m, link, args.max_new_tokens, args.draft_len,
                               switch_tpot_s) for m in METHODS}
            reference = results["server-only"]["token_ids"]
            for out in results.values():
                same = out.pop("token_ids") == reference
                rows.append({"link": name, "prompt_id": prompt["id"], "kind": prompt["kind"], **out,
                             "same_as_server_only": same})
    meta = {"thresholds": thresholds, "draft_len": args.draft_len, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    return rows, meta


def _by_prompt(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["prompt_id"], {})[row["method"]] = row
    return out


def _by_link(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["link"], []).append(row)
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Geometric means over prompts of the switch's time per token against each alternative."""
    ratios: dict[str, list[float]] = {"vs_device_edge": [], "vs_best_of_both": [], "vs_server_only": []}
    for methods in _by_prompt(rows).values():
        switch = methods["device-edge+switch"]["s_per_token"]
        spec, alone = methods["device-edge"]["s_per_token"], methods["server-only"]["s_per_token"]
        ratios["vs_device_edge"].append(switch / spec)
        ratios["vs_server_only"].append(switch / alone)
        ratios["vs_best_of_both"].append(switch / min(spec, alone))
    return {key: statistics.geometric_mean(values) for key, values in ratios.items() if values}


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any], command: str) -> None:
    lines = [
        "# Re-deciding device-edge requests at a round boundary",
        "",
        f"Command: `{command}` ({meta['date']}). Pair: Qwen2.5-Coder 0.5B drafter, 1.5B verifier, HF engines "
        f"({meta['dtype']}), one process; links on a virtual clock (compute timed for real); k = "
        f"{meta['draft_len']}; {meta['max_new_tokens']} tokens a request (end of sequence ignored). Every request "
        "is sent device-edge, as the router would send a request whose class it expects to accept well; the "
        "switch's threshold is server-only's TPOT measured on two warm-up prompts, as the router predicts it, "
        "and a request switches after three rounds past the prefill that ran over 1.25x that. Prompts run "
        "interleaved, the three methods one after another. 'same output' compares with server-only: bf16 "
        "kernels part at near-ties (docs/design.md), which the fp32 tests rule out.",
        "",
    ]
    for link, link_rows in _by_link(rows).items():
        means = summary(link_rows)
        lines += [
            f"## {link}: threshold {1e3 * meta['thresholds'][link]:.1f} ms",
            "",
            "Time per output token end to end, (TTFT + decode) / tokens, in ms:",
            "",
            "| prompt | kind | server-only | device-edge | device-edge + switch | switched at token | acceptance "
            "| switch / device-edge | switch / best of both | same output |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for prompt_id, methods in _by_prompt(link_rows).items():
            alone, spec, switch = methods["server-only"], methods["device-edge"], methods["device-edge+switch"]
            best = min(alone["s_per_token"], spec["s_per_token"])
            same = "yes" if spec["same_as_server_only"] and switch["same_as_server_only"] else "no"
            at = switch["switched_at"] if switch["switched_at"] >= 0 else "-"
            lines.append(
                f"| {prompt_id} | {alone['kind']} | {1e3 * alone['s_per_token']:.1f} | "
                f"{1e3 * spec['s_per_token']:.1f} | {1e3 * switch['s_per_token']:.1f} | {at} | "
                f"{spec['acceptance']:.2f} | {switch['s_per_token'] / spec['s_per_token']:.2f}x | "
                f"{switch['s_per_token'] / best:.2f}x | {same} |")
        switched = sum(1 for r in link_rows if r["method"] == "device-edge+switch" and r["switched_at"] >= 0)
        lines += [
            "",
            f"{switched} of {len(_by_prompt(link_rows))} requests switched. Geometric means over prompts: with the "
            f"switch / device-edge alone **{means['vs_device_edge']:.2f}x**, / server-only "
            f"{means['vs_server_only']:.2f}x, / the better of the two for each prompt "
            f"**{means['vs_best_of_both']:.2f}x** (1.00x: the switch found the better path at no cost).",
            "",
        ]
    path.write_text("\n".join(lines))


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = _by_link(rows)
    fig, axes = plt.subplots(len(links), 1, figsize=(9, 3.5 * len(links)), squeeze=False)
    width = 0.27
    for ax, (link, link_rows) in zip(axes[:, 0], links.items(), strict=True):
        by_prompt = _by_prompt(link_rows)
        names = list(by_prompt)
        for i, method in enumerate(METHODS):
            ax.bar([x + (i - 1) * width for x in range(len(names))],
                   [1e3 * by_prompt[n][method]["s_per_token"] for n in names], width, label=method)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("ms per output token")
        ax.set_title(f"device-edge re-decided at a round boundary ({link})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-per-kind", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--links", default="500KB/s@80,500KB/s@200",
                        help="bandwidth@RTT-ms, comma-separated (the paper's slow links, two latencies)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    return parser


def main(argv: list[str] | None = None) -> None:
    import sys

    args = build_parser().parse_args(argv)
    rows, meta = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "path_switch.csv", rows, FIELDS)
    command = "python -m aiflow_ray.bench.path_switch " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(args.out / "path_switch.md", rows, meta, command.strip())
    write_plot(args.out / "path_switch.png", rows)
    print((args.out / "path_switch.md").read_text())


if __name__ == "__main__":
    main()
