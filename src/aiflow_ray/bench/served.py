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

from aiflow_ray.bench import write_csv
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


class RawLlama:
    """llama-cpp-python's ``Llama`` decoding greedily, as a user's own server would (all cores, bare process)."""

    def __init__(self, model: str) -> None:
        import os

        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from aiflow_ray.engines.loader import resolve_gguf

        threads = os.cpu_count() or 1
        self.llm = Llama(str(resolve_gguf(model)), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.chat = Jinja2ChatFormatter(template=self.llm.metadata["tokenizer.chat_template"],
                                        eos_token="<|im_end|>", bos_token="")

    def tpot_s(self, prompt: str, max_tokens: int) -> float:
        text = self.chat(messages=[{"role": "user", "content": prompt}]).prompt
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        times = []
        for _, _token in zip(range(max_tokens), self.llm.generate(ids, top_k=1, temp=0.0, reset=True), strict=False):
            times.append(time.perf_counter())
        return (times[-1] - times[0]) / (len(times) - 1)


def _bare(pipeline: Any, prompt: dict[str, str], path: str, bw: float, max_tokens: int, rtt_s: float) -> dict[str, Any]:
    opts = GenerateOptions(prompt=prompt["prompt"], path=path, draft_len="auto",
                           max_new_tokens=max_tokens, link=LinkConfig(bandwidth_bps=bw, rtt_s=rtt_s),
                           min_tokens=max_tokens)
    trace = pipeline.run(opts).trace
    return {"tpot_s": trace.tpot_s, "ttft_s": trace.ttft_s, "chosen_path": path}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per pair and prompt, each served request is followed at once by the same request in this process and,
    for the llama.cpp paths, by the raw decode: on a shared machine whose speed drifts, only neighbours in
    time compare."""
    from aiflow_ray.engines.loader import load_engine
    from aiflow_ray.tiers.pipeline import Pipeline

    client = AiflowClient(args.url)
    prompts = _prompts(args.prompts_per_kind)
    bandwidths = [parse_bandwidth_bps(b) for b in args.bandwidths.split(",")]
    pairs = args.pairs.split(",")
    raw = {DRAFTER: RawLlama(DRAFTER), VERIFIER: RawLlama(VERIFIER)}
    runs: list[tuple[str, float | None]] = [("on-device", None), ("server-only", None)]
    runs += [(path, bw) for bw in bandwidths for path in ("device-edge", "auto")]
    bar = tqdm(total=len(pairs) * len(prompts) * len(runs), desc="served vs bare vs raw", unit="request")
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        bar.set_postfix_str(f"deploying {pair}")
        _deploy(pair)
        for bw in bandwidths:  # the deployment restarted the router, which keeps the emulated links
            client.set_link(f"bench-{int(bw)}", bw, args.rtt_ms)
        client.generate(prompt="warm up", path="server-only", max_tokens=4)
        drafter_engine, verifier_engine = pair.split("/")
        pipeline = Pipeline(load_engine(DRAFTER, engine=drafter_engine),
                            load_engine(VERIFIER, engine=verifier_engine))
        bar.set_postfix_str(pair)
        for prompt in prompts:
            for path, link_bw in runs:
                bw = link_bw or bandwidths[0]
                body: dict[str, Any] = {"path": path, "link_id": f"bench-{int(bw)}"}
                if path == "device-edge":
                    body["draft_len"] = "auto"
                common = {"pair": pair, "path": path, "bandwidth_bps": link_bw or "", "kind": prompt["kind"]}
                out = _served(client, prompt["prompt"], args.max_new_tokens, **body)
                rows.append({**common, "mode": "served", **out})
                if path != "auto":
                    rows.append({**common, "mode": "bare", **_bare(pipeline, prompt, path, bw, args.max_new_tokens,
                                                                   args.rtt_ms / 1e3)})
                engine = drafter_engine if path == "on-device" else verifier_engine
                if path in ("on-device", "server-only") and engine == "llama_cpp":
                    model = DRAFTER if path == "on-device" else VERIFIER
                    rows.append({**common, "mode": "raw", "path": model,
                                 "tpot_s": raw[model].tpot_s(prompt["prompt"], args.max_new_tokens)})
                bar.update(1)
        del pipeline
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


ENGINE_LABELS = {"hf": "hf bf16", "llama_cpp": "llama_cpp (ours)"}


def where_speculation_pays(engines_csv: Path, rtt_s: float) -> list[str]:
    """From the measured decode and verify(k) curves (engines.csv): each pair's best k and its predicted
    speculative/server-only TPOT, with the cost model (serial rounds, ids only on the link)."""
    from aiflow_ray.speculative.cost_model import expected_tokens

    if not engines_csv.exists():
        return []
    with engines_csv.open() as handle:
        curves: dict[tuple[str, str], dict[tuple[str, int], float]] = {}
        for r in csv.DictReader(handle):
            curves.setdefault((r["model"], r["engine"]), {})[(r["op"], int(r["k"]))] = float(r["ms"]) / 1e3
    lines = ["## Where speculation pays on this CPU (from the measured curves)", "",
             "Predicted from [engines.csv](engines.csv): a round costs k drafter decodes + verify(k) + RTT and "
             "yields E(k) = (1 - a^(k+1)) / (1 - a) tokens; server-only costs one verifier decode a token. "
             "Acceptance a = 0.6 (English prompts) and 0.8 (code) span what the TPOT sweep measured.", "",
             "| drafter/verifier | drafter decode / verifier decode | a | best k "
             "| predicted speculative / server-only |",
             "|---|---|---|---|---|"]
    for pair in PAIRS:
        d_engine, v_engine = (ENGINE_LABELS[e] for e in pair.split("/"))
        drafter, verifier = curves.get((DRAFTER, d_engine)), curves.get((VERIFIER, v_engine))
        if not drafter or not verifier:
            continue
        t_d, t_dec = drafter[("decode", 1)], verifier[("decode", 1)]
        ks = sorted(k for op, k in verifier if op == "verify")

        def t_v(k: int, verifier: dict[tuple[str, int], float] = verifier, ks: list[int] = ks) -> float:
            lo = max(x for x in ks if x <= k)
            hi = min((x for x in ks if x >= k), default=lo)
            if hi == lo:
                return verifier[("verify", lo)]
            w = (k - lo) / (hi - lo)
            return (1 - w) * verifier[("verify", lo)] + w * verifier[("verify", hi)]

        for alpha in (0.6, 0.8):
            best = min(range(1, ks[-1] + 1), key=lambda k: (k * t_d + t_v(k) + rtt_s) / expected_tokens(k, alpha))
            ratio = (best * t_d + t_v(best) + rtt_s) / expected_tokens(best, alpha) / t_dec
            lines.append(f"| {pair} | {t_d / t_dec:.2f} | {alpha} | {best} | {ratio:.2f}x |")
    lines += ["", "Speculation pays when k drafter decodes plus one verify of k tokens cost less than E(k) verifier "
              "decodes. The HF verifier's verify(k) is flat in k (launch- and memory-bound at bf16), so a cheap "
              "drafter pays. llama.cpp's is not: on 2 cores a block of 2 tokens already costs 1.6 decodes of the "
              "1.5B and each further token adds about 0.2 (evaluating a block is compute-bound here, one token is "
              "memory-bound), and its 0.5B drafter costs 0.6 of the 1.5B's decode on the same cores: k drafts "
              "plus the verify cost more than the tokens they save, at every k. The router "
              "sees the same curves (the edge reports verify times by tokens fed; the device its drafting speed) "
              "and sends exact requests server-only on llama.cpp/llama.cpp and device-edge on llama.cpp/hf. On a "
              "GPU verifier (vLLM) verify(k) is flat again, which is where the paper's 2x lives.", ""]
    return lines


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
        "## The limit: raw llama.cpp (`Llama.generate`, greedy, all cores, bare process; each measured right "
        "after the served request of the same prompt, all pairs pooled)", "",
        "| model | TPOT |", "|---|---|",
        *(f"| {m} | {_ms(raw[m])} |" for m in (DRAFTER, VERIFIER)), "",
        "## Served vs bare process vs raw", "",
        "device-edge and auto at each bandwidth; server-only and on-device do not depend on it (tokens stream "
        "one message each).", "",
        "served / raw compares with the raw decode measured next to it in time (llama.cpp tiers only).", "",
        "| drafter/verifier | path | bandwidth | bare TPOT | served TPOT | served / bare | served / raw |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for path in ("on-device", "server-only", "device-edge", "auto"):
            for bw in ([""] if path in ("on-device", "server-only") else bandwidths):
                bare = _median(rows, pair=pair, mode="bare", path=path, bandwidth_bps=bw)
                served = _median(rows, pair=pair, mode="served", path=path, bandwidth_bps=bw)
                engine = pair.split("/")[0 if path == "on-device" else 1]
                model = DRAFTER if path == "on-device" else VERIFIER
                limit = _median(rows, mode="raw", path=model, pair=pair) if engine == "llama_cpp" else None
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
    lines += ["", *where_speculation_pays(out / "engines.csv", args.rtt_ms / 1e3)]
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
        for mode, alpha in (("served", 1.0), ("bare", 0.5)):  # bare narrow, on top
            values = [(_median(rows, pair=pair, mode=mode, path=p,
                               bandwidth_bps="" if p in ("on-device", "server-only") else bw) or 0) * 1e3
                      for p in paths]
            ax.bar([j + i * width for j in range(len(paths))], values, width * (0.5 if mode == "bare" else 0.9),
                   alpha=alpha, color=f"C{i}", edgecolor="k" if mode == "bare" else None,
                   zorder=3 if mode == "bare" else 2, label=f"{pair} ({mode})")
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


def pair_sweep_parser(doc: str | None, prompts_per_kind: int, max_new_tokens: int, csv_name: str
                      ) -> argparse.ArgumentParser:
    """The arguments of a sweep over engine pairs, paths and bandwidths against the running API."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--prompts-per-kind", type=int, default=prompts_per_kind)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--bandwidths", default="500KB/s,1MB/s,2MB/s")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--report-only", action="store_true", help=f"rewrite the report and plot from {csv_name}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = pair_sweep_parser(__doc__, 2, 48, "served.csv").parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        with (out / "served.csv").open() as handle:
            rows = [{k: (float(v) if k == "bandwidth_bps" and v else v) for k, v in r.items()}
                    for r in csv.DictReader(handle)]
        print(report(rows, args, out))
        plot(rows, args, out)
        return
    rows = run(args)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["pair", "mode", "path", "bandwidth_bps", "kind", "tpot_s", "ttft_s", "trace_tpot_s", "chosen_path",
              "draft_len"]
    write_csv(out / "served.csv", rows, fields)
    print(report(rows, args, out))
    plot(rows, args, out)


if __name__ == "__main__":
    main()
