"""Served TPOT per engine choice and path, against the same engines in a bare process and raw llama.cpp.

    make run                             # the local cluster
    python -m aiflow_ray.bench.served    # writes docs/benchmarks/served.{csv,md,png}; restores the profile

For each drafter/verifier engine pair (hf/hf, llama_cpp/hf, llama_cpp/llama_cpp) the bench deploys the
local profile with those engines (``aiflow deploy --set device.engine=... --set edge.engine=...``) and
streams the same prompts through the API: on-device, server-only, device-edge (adaptive k) and auto, the
last two at each link bandwidth. Client TPOT is measured where a user measures it, from the streamed
chunks: (last arrival - first arrival) / (tokens after the first chunk). The same pair then runs the
same requests in this process over the same link emulator (the bare-process row), and llama-cpp-python's
own ``Llama.generate`` decodes each GGUF greedily as the limit a user could run instead (the raw row).
Everything is measured side by side in one run, interleaved per engine pair.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.client import AiflowClient
from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.data import load_prompts
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps

PAIRS = ("hf/hf", "llama_cpp/hf", "llama_cpp/llama_cpp")
DRAFTER, VERIFIER = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def _prompts(per_kind: int) -> list[dict[str, str]]:
    chosen: list[dict[str, str]] = []
    for kind in ("code", "english"):
        chosen += [p for p in load_prompts() if p["kind"] == kind][:per_kind]
    return chosen


def _deploy(pair: str | None) -> None:
    cmd = [str(Path(sys.executable).with_name("aiflow")), "deploy", "--profile", "local"]
    if pair is not None:
        drafter, verifier = pair.split("/")
        cmd += ["--set", f"device.engine={drafter}", "--set", f"edge.engine={verifier}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _served(client: AiflowClient, prompt: str, max_tokens: int, **body: Any) -> dict[str, Any]:
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    done: dict[str, Any] = {}
    for at, event in client.stream_generate(prompt=prompt, max_tokens=max_tokens, ignore_eos=True, **body):
        if event.get("done"):
            done = event
        elif event.get("token_ids"):
            arrivals.append((at, len(event["token_ids"])))
    first_at, first_n = arrivals[0]
    after_first = sum(n for _, n in arrivals) - first_n
    return {"tpot_s": (arrivals[-1][0] - first_at) / max(after_first, 1), "ttft_s": first_at - sent,
            "trace_tpot_s": done["trace"]["tpot_s"], "chosen_path": done["route"]["path"],
            "draft_len": done["route"].get("draft_len")}


def _raw_llama_tpot_s(model: str, prompt: str, max_tokens: int) -> float:
    """llama-cpp-python's ``Llama`` decoding greedily, as a user's own server would (all cores)."""
    import os

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from aiflow_ray.engines.loader import resolve_gguf

    threads = os.cpu_count() or 1
    llm = Llama(str(resolve_gguf(model)), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    chat = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
    text = chat(messages=[{"role": "user", "content": prompt}]).prompt
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    times = []
    for _, _token in zip(range(max_tokens), llm.generate(ids, top_k=1, temp=0.0, reset=True), strict=False):
        times.append(time.perf_counter())
    del llm
    return (times[-1] - times[0]) / (len(times) - 1)


def _bare_rows(pair: str, prompts: list[dict[str, str]], bandwidths: list[float], max_tokens: int,
               rtt_s: float, bar: Any) -> list[dict[str, Any]]:
    from aiflow_ray.engines.loader import load_engine
    from aiflow_ray.tiers.pipeline import Pipeline

    drafter_engine, verifier_engine = pair.split("/")
    pipeline = Pipeline(load_engine(DRAFTER, engine=drafter_engine),  # type: ignore[arg-type]
                        load_engine(VERIFIER, engine=verifier_engine))  # type: ignore[arg-type]
    rows = []
    for prompt in prompts:
        runs: list[tuple[str, float | None]] = [("on-device", None), ("server-only", None)]
        runs += [("device-edge", bw) for bw in bandwidths]
        for path, bw in runs:
            link = LinkConfig(bandwidth_bps=bw or bandwidths[0], rtt_s=rtt_s)
            opts = GenerateOptions(prompt=prompt["prompt"], path=path, draft_len="auto", max_new_tokens=max_tokens,
                                   link=link, min_tokens=max_tokens)
            trace = pipeline.run(opts).trace
            rows.append({"pair": pair, "mode": "bare", "path": path, "bandwidth_bps": bw or "", "kind": prompt["kind"],
                         "tpot_s": trace.tpot_s, "ttft_s": trace.ttft_s, "chosen_path": path, "draft_len": ""})
            bar.update(1)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    client = AiflowClient(args.url)
    prompts = _prompts(args.prompts_per_kind)
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    pairs = args.pairs.split(",")
    per_pair = len(prompts) * (2 + 2 * len(bandwidths)) + len(prompts) * (2 + len(bandwidths))
    bar = tqdm(total=len(pairs) * per_pair + 2 * len(prompts), desc="served vs bare", unit="run")
    rows: list[dict[str, Any]] = []
    for bw in bandwidths:
        client.set_link(f"bench-{int(bw)}", bw, args.rtt_ms)
    for pair in pairs:
        bar.set_postfix_str(f"deploying {pair}")
        _deploy(pair)
        for bw in bandwidths:  # the deployment restarted the router, which keeps the emulated links
            client.set_link(f"bench-{int(bw)}", bw, args.rtt_ms)
        client.generate(prompt="warm up", path="server-only", max_tokens=4)
        for prompt in prompts:
            runs: list[tuple[str, float | None]] = [("on-device", None), ("server-only", None)]
            runs += [(path, bw) for bw in bandwidths for path in ("device-edge", "auto")]
            for path, link_bw in runs:
                body: dict[str, Any] = {"path": path, "link_id": f"bench-{int(link_bw or bandwidths[0])}"}
                if path == "device-edge":
                    body["draft_len"] = "auto"
                out = _served(client, prompt["prompt"], args.max_new_tokens, **body)
                rows.append({"pair": pair, "mode": "served", "path": path, "bandwidth_bps": link_bw or "",
                             "kind": prompt["kind"], **out})
                bar.update(1)
        rows += _bare_rows(pair, prompts, bandwidths, args.max_new_tokens, args.rtt_ms / 1e3, bar)
    for model in (DRAFTER, VERIFIER):
        for prompt in prompts:
            rows.append({"pair": "raw llama.cpp", "mode": "raw", "path": model, "bandwidth_bps": "",
                         "kind": prompt["kind"], "tpot_s": _raw_llama_tpot_s(model, prompt["prompt"],
                                                                             args.max_new_tokens)})
            bar.update(1)
    bar.close()
    _deploy(None)
    return rows


def _median(rows: list[dict[str, Any]], **match: Any) -> float | None:
    values = [float(r["tpot_s"]) for r in rows if all(r.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> str:
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    pairs = args.pairs.split(",")
    raw = {m: _median(rows, mode="raw", path=m) for m in (DRAFTER, VERIFIER)}
    lines = [
        "# Served TPOT per engine pair and path", "",
        f"Reproduce: `make run && python -m aiflow_ray.bench.served --prompts-per-kind {args.prompts_per_kind} "
        f"--max-new-tokens {args.max_new_tokens}` (all rows measured in that one run; {args.max_new_tokens} tokens, "
        f"greedy, streamed, EOS ignored; RTT {args.rtt_ms:g} ms; medians over {2 * args.prompts_per_kind} prompts, "
        "half code, half English). Client TPOT: from the streamed chunks, as a user measures it.", "",
        "## The limit: raw llama.cpp (`Llama.generate`, greedy, all cores, bare process)", "",
        "| model | TPOT |", "|---|---|",
        *(f"| {m} | {_ms(raw[m])} |" for m in (DRAFTER, VERIFIER)), "",
        "## Served vs bare process vs raw", "",
        "device-edge and auto at each bandwidth; server-only and on-device do not depend on it (tokens stream "
        "one message each).", "",
        "| drafter/verifier | path | bandwidth | bare TPOT | served TPOT | served / bare | served / raw |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for path in ("on-device", "server-only", "device-edge", "auto"):
            for bw in ([""] if path in ("on-device", "server-only") else bandwidths):
                bare = _median(rows, pair=pair, mode="bare", path=path, bandwidth_bps=bw)
                served = _median(rows, pair=pair, mode="served", path=path, bandwidth_bps=bw)
                engine = pair.split("/")[0 if path == "on-device" else 1]
                limit = raw[DRAFTER if path == "on-device" else VERIFIER] if engine == "llama_cpp" else None
                bw_label = format_bandwidth(float(bw)) if bw else "any"
                lines.append(f"| {pair} | {path} | {bw_label} | {_ms(bare)} | {_ms(served)} | {_ratio(served, bare)} "
                             f"| {_ratio(served, limit) if path in ('on-device', 'server-only') else '-'} |")
    lines += ["", "## Speculative vs server-only, served (device-edge TPOT / server-only TPOT)", "",
              "| drafter/verifier | " + " | ".join(format_bandwidth(b) for b in bandwidths) + " |",
              "|---|" + "---|" * len(bandwidths)]
    for pair in pairs:
        server = _median(rows, pair=pair, mode="served", path="server-only")
        cells = [_ratio(_median(rows, pair=pair, mode="served", path="device-edge", bandwidth_bps=b), server)
                 for b in bandwidths]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines += ["", "## Auto vs the best forced path (exact quality: device-edge or server-only), served", "",
              "| drafter/verifier | prompts | bandwidth | auto chose | auto TPOT | best forced | auto / best |",
              "|---|---|---|---|---|---|---|"]
    for pair in pairs:
        for kind in ("code", "english"):
            for bw in bandwidths:
                auto = _median(rows, pair=pair, mode="served", path="auto", bandwidth_bps=bw, kind=kind)
                forced = {"device-edge": _median(rows, pair=pair, mode="served", path="device-edge", bandwidth_bps=bw,
                                                 kind=kind),
                          "server-only": _median(rows, pair=pair, mode="served", path="server-only", kind=kind)}
                best = min((p for p in forced if forced[p] is not None), key=lambda p: forced[p] or 0.0)
                chose = sorted({str(r["chosen_path"]) for r in rows if r["pair"] == pair and r["mode"] == "served"
                                and r["path"] == "auto" and r["bandwidth_bps"] == bw and r["kind"] == kind})
                lines.append(f"| {pair} | {kind} | {format_bandwidth(bw)} | {', '.join(chose)} | {_ms(auto)} | "
                             f"{best} {_ms(forced[best])} | {_ratio(auto, forced[best])} |")
    text = "\n".join(lines) + "\n"
    (out / "served.md").write_text(text)
    return text


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = args.pairs.split(",")
    bw = parse_bandwidth_bps(args.bandwidths.split(",")[len(args.bandwidths.split(",")) // 2])
    paths = ("on-device", "server-only", "device-edge", "auto")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(pairs)
    for i, pair in enumerate(pairs):
        for mode, alpha in (("bare", 0.45), ("served", 1.0)):
            values = [(_median(rows, pair=pair, mode=mode, path=p,
                               bandwidth_bps="" if p in ("on-device", "server-only") else bw) or 0) * 1e3
                      for p in paths]
            ax.bar([j + i * width for j in range(len(paths))], values, width * (0.5 if mode == "bare" else 0.9),
                   alpha=alpha, color=f"C{i}", label=f"{pair} ({mode})")
    for model, style in ((DRAFTER, ":"), (VERIFIER, "--")):
        limit = _median(rows, mode="raw", path=model)
        if limit:
            ax.axhline(limit * 1e3, linestyle=style, color="k", linewidth=1, label=f"raw llama.cpp {model}")
    ax.set_xticks([j + width * (len(pairs) - 1) / 2 for j in range(len(paths))], paths)
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(f"Served vs bare TPOT per engine pair (device-edge and auto at {format_bandwidth(bw)})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "served.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--prompts-per-kind", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--bandwidths", default="500KB/s,1MB/s,2MB/s")
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["pair", "mode", "path", "bandwidth_bps", "kind", "tpot_s", "ttft_s", "trace_tpot_s", "chosen_path",
              "draft_len"]
    with (out / "served.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(report(rows, args, out))
    plot(rows, args, out)


if __name__ == "__main__":
    main()
