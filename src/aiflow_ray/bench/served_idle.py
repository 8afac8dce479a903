"""Served TTFT and TPOT against raw llama.cpp on an idle machine, as a user comparing the two measures them.

    python -m aiflow_ray.bench.served_idle    # writes docs/benchmarks/served_idle.{csv,md,png}

One command, three phases, so the raw engine's first measurement has the machine to itself:

1. **Idle raw**: with no cluster running (it refuses to start if one answers), llama-cpp-python's ``Llama``
   (the GGUF as released, all cores, one bare process) decodes each prompt greedily: the drafter's model
   (0.5B, the on-device path's) and the verifier's (1.5B, server-only's). TTFT: prompt in, first token out.
2. **Served**: the local profile started (``aiflow cluster up``, ``aiflow deploy --profile local``: llama.cpp on
   every tier), the same prompts through the openai client, streamed, on forced paths (on-device, server-only),
   exactly ``--max-tokens`` tokens each (``ignore_eos``). TTFT: request sent, first content chunk received.
   TPOT: (last chunk - first chunk) / (tokens - 1), tokens from the usage the stream ends with.
3. **Raw beside the cluster**: the phase-1 measurement again with the idle cluster up, the column served.md used.

The cluster is stopped at the end (``aiflow cluster down``). Served TTFT includes the emulated link's own
time on server-only (the RTT and the prompt's bytes at the link's bandwidth), which the table lists.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.bench.served import DRAFTER, VERIFIER, RawLlama, _prompts
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

# What a user asks for, and the raw model it compares with. The openai API picks the path from the model: the
# drafter's name runs on the device, the verifier's is auto (exact; the router chooses); server-only is forced
# through the native API (/v1/generate, streamed), which takes a path.
PATH_MODEL = {"on-device": DRAFTER, "server-only": VERIFIER, "auto": VERIFIER}
API_KEY = "served-idle-bench"
HISTORY = "## What the runs show"


def _aiflow(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("aiflow")), *args], check=True, stdout=subprocess.DEVNULL)


def raw_row(raw: RawLlama, prompt: str, max_tokens: int) -> dict[str, float]:
    text = raw.chat(messages=[{"role": "user", "content": prompt}]).prompt
    ids = raw.llm.tokenize(text.encode(), add_bos=False, special=True)
    started = time.perf_counter()
    times = []
    for _, _token in zip(range(max_tokens), raw.llm.generate(ids, top_k=1, temp=0.0, reset=True), strict=False):
        times.append(time.perf_counter())
    return {"ttft_s": times[0] - started, "tpot_s": (times[-1] - times[0]) / (len(times) - 1),
            "prompt_tokens": len(ids)}


def served_row(base_url: str, model: str, path: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    if path == "server-only":
        from aiflow_ray.bench.served import _served
        from aiflow_ray.client import AiflowClient

        got = _served(AiflowClient(base_url), prompt, max_tokens, path=path, chat=True)
        return {"ttft_s": got["ttft_s"], "tpot_s": got["tpot_s"], "chosen_path": got["chosen_path"], "api": "native"}
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=300)
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": arrivals[0] - sent, "tpot_s": (arrivals[-1] - arrivals[0]) / max(tokens - 1, 1),
            "chosen_path": path if path == "on-device" else "", "api": "openai"}


def _asked(number: int, prompt: str) -> str:
    """Every request a prompt of its own: both sides keep the KV of earlier prompts (llama-cpp-python's ``Llama``
    reuses its last prompt's longest common prefix, as llama-server's slots do; the served engines share
    prefixes across sessions), so a prompt asked twice would time a prefill of nothing. Numbered at the
    start, requests share the chat template's system turn and no more, on both sides."""
    return f"Request {number}. {prompt}"


def _cluster_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _raw_rows(mode: str, desc: str, prompts: list[dict[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both raw models on every prompt; the engines are loaded here and freed after, so the cluster's engines
    have the memory and the cores when it runs."""
    raw = {model: RawLlama(model) for model in (DRAFTER, VERIFIER)}
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(prompts) * args.repeats * len(raw), desc=desc, unit="request") as bar:
        for repeat in range(args.repeats):
            for i, prompt in enumerate(prompts):
                for j, (model, engine) in enumerate(raw.items()):
                    asked = _asked((repeat * len(prompts) + i) * len(raw) + j, prompt["prompt"])
                    rows.append({"mode": mode, "model": model, "kind": prompt["kind"],
                                 **raw_row(engine, asked, args.max_tokens)})
                    bar.update()
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import os

    if _cluster_answers(args.url):
        raise SystemExit(f"a cluster answers at {args.url}: stop it (make stop) so the raw engine runs alone")
    prompts = _prompts(args.prompts_per_kind)
    rows = _raw_rows("raw-idle", "raw llama.cpp, idle machine", prompts, args)
    log.info("starting the local cluster (llama.cpp on every tier)")
    os.environ["AIFLOW_API_KEY"] = API_KEY
    _aiflow("cluster", "up")
    try:
        _aiflow("deploy", "--profile", "local", "--http-port", args.url.rsplit(":", 1)[1])  # as `make run` serves it
        for prompt in prompts[:1]:  # warm the paths once: first requests pay one-off allocations
            for path, model in PATH_MODEL.items():
                served_row(args.url, model, path, prompt["prompt"], 8)
        time.sleep(args.settle_s)
        with tqdm(total=len(prompts) * args.repeats * len(PATH_MODEL), desc="served", unit="request") as bar:
            for repeat in range(args.repeats):
                for i, prompt in enumerate(prompts):
                    for j, (path, model) in enumerate(PATH_MODEL.items()):
                        asked = _asked((repeat * len(prompts) + i) * len(PATH_MODEL) + j, prompt["prompt"])
                        rows.append({"mode": "served", "path": path, "model": model, "kind": prompt["kind"],
                                     **served_row(args.url, model, path, asked, args.max_tokens)})
                        bar.update()
        rows += _raw_rows("raw-beside", "raw llama.cpp beside the idle cluster", prompts, args)
    finally:
        _aiflow("cluster", "down")
    return rows


def _link() -> Any:
    from aiflow_ray.config import AppArgs
    from aiflow_ray.serve.configs import profile_args

    return AppArgs.model_validate(profile_args("local")).link


def _median(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    values = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else float("nan")


def write_report(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    write_csv(out / "served_idle.csv", rows)
    lines = [
        "# Served vs raw llama.cpp on an idle machine", "",
        f"Reproduce: `python -m aiflow_ray.bench.served_idle --prompts-per-kind {args.prompts_per_kind} "
        f"--repeats {args.repeats} --max-tokens {args.max_tokens}` (the cluster stopped first: it starts and stops "
        "the local profile itself). Medians over the prompts (half code, half English) and repeats; "
        f"{args.max_tokens} greedy tokens each. Raw: llama-cpp-python's `Llama`, all cores, one bare process; "
        "served: the openai client against `make run`'s local profile (llama.cpp on every tier), streamed, path "
        "forced. Targets: served TPOT at most 1.15x the idle raw engine; served TTFT at most the raw TTFT plus "
        "the link's own time plus 30 ms.", "",
        "| path (model) | raw TTFT, idle | link | served TTFT | served - (raw + link) | raw TPOT, idle | "
        "served TPOT | served / raw idle | raw TPOT beside the cluster | served / raw beside |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    link = _link()
    for path, model in PATH_MODEL.items():
        raw_ttft = _median(rows, "ttft_s", mode="raw-idle", model=model)
        served_ttft = _median(rows, "ttft_s", mode="served", path=path)
        raw_tpot = _median(rows, "tpot_s", mode="raw-idle", model=model)
        served_tpot = _median(rows, "tpot_s", mode="served", path=path)
        beside = _median(rows, "tpot_s", mode="raw-beside", model=model)
        # Only token ids cross the link (4 bytes each), after one round trip; on-device never crosses it.
        link_s = 0.0 if path == "on-device" else link.rtt_s + 4 * _median(
            rows, "prompt_tokens", mode="raw-idle", model=model) / link.bandwidth_bps
        lines.append(f"| {path} ({model}) | {raw_ttft * 1e3:.1f} ms | {link_s * 1e3:.1f} ms | "
                     f"{served_ttft * 1e3:.1f} ms | {(served_ttft - raw_ttft - link_s) * 1e3:+.1f} ms | "
                     f"{raw_tpot * 1e3:.1f} ms | {served_tpot * 1e3:.1f} ms | {served_tpot / raw_tpot:.2f}x | "
                     f"{beside * 1e3:.1f} ms | {served_tpot / beside:.2f}x |")
    lines += ["", "Per prompt kind (TPOT):", "", "| path | kind | raw idle | served | served / raw idle |",
              "|---|---|---|---|---|"]
    for path, model in PATH_MODEL.items():
        for kind in ("code", "english"):
            raw_tpot = _median(rows, "tpot_s", mode="raw-idle", model=model, kind=kind)
            served_tpot = _median(rows, "tpot_s", mode="served", path=path, kind=kind)
            lines.append(f"| {path} | {kind} | {raw_tpot * 1e3:.1f} ms | {served_tpot * 1e3:.1f} ms | "
                         f"{served_tpot / raw_tpot:.2f}x |")
    report = out / "served_idle.md"
    # The notes on earlier runs (written by hand, below the generated tables) stay with the new tables.
    notes = report.read_text().partition(HISTORY)[2] if report.exists() else ""
    report.write_text("\n".join(lines) + "\n" + (f"\n{HISTORY}{notes}" if notes else ""))
    _plot(rows, out / "served_idle.png")


def _plot(rows: list[dict[str, Any]], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    modes = (("raw-idle", "raw, idle machine"), ("served", "served (openai client)"),
             ("raw-beside", "raw beside the cluster"))
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        for i, (mode, label) in enumerate(modes):
            values = [_median(rows, key, mode=mode, **({"path": path} if mode == "served" else {"model": model})) * 1e3
                      for path, model in PATH_MODEL.items()]
            ax.bar([j + i * 0.27 for j in range(len(PATH_MODEL))], values, 0.27, label=label)
        ax.set_xticks([j + 0.27 for j in range(len(PATH_MODEL))], [f"{p}\n({m})" for p, m in PATH_MODEL.items()])
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompts-per-kind", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settle-s", type=float, default=20.0,
                        help="wait after deploying, so the start-up calibrations are done")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    rows = run(args)
    write_report(rows, args.out, args)
    print((args.out / "served_idle.md").read_text())


if __name__ == "__main__":
    main()
