"""Engine speed on this machine: decode one token, and verify a block of k tokens in one forward.

    python -m aiflow_ray.bench.engines      # writes docs/benchmarks/engines.{csv,md,png}

Per model of the default pair and per engine: the HF reference (bf16), our llama.cpp engine (the
Q4_K_M GGUF as released), and llama-cpp-python's own high-level ``Llama`` on the same GGUF, the
runtime a user could take instead. Times are medians over repeats on a context of about 60 tokens,
measured side by side in one run; the verify cost of a block of k tokens is what the cost model's
t_v(k) is, and decode is what server-only TPOT is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.config import SamplingConfig
from aiflow_ray.data import load_prompts

MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
BLOCKS = (1, 2, 4, 8, 16)
NOTE = ("Our engine's verify k feeds k+1 tokens (the last committed token, whose logits predict the first draft "
        "token, plus the draft), as a speculative round must; the Llama rows feed k tokens. Per token fed the two "
        "match (ours k=1 ~ Llama k=2, ours k=4 between Llama k=4 and k=8), and decode is equal at equal threads.")
GREEDY = SamplingConfig()


def _median_s(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _engine_rows(engine: Any, label: str, model: str, ids: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    sid = "bench"
    engine.open_session(sid, ids)
    engine.score(sid, [], GREEDY)  # prefill
    base = engine.session_length(sid)

    def decode() -> None:
        token = engine.score(sid, [], GREEDY).greedy_ids[0]
        engine.append(sid, [token])

    rows.append({"model": model, "engine": label, "op": "decode", "k": 1,
                 "ms": 1e3 * _median_s(decode, repeats)})
    engine.rollback(sid, base)
    for k in BLOCKS:
        block = ids[1 : k + 1]

        def verify(block: list[int] = block) -> None:
            engine.score(sid, block, GREEDY)
            engine.rollback(sid, base)

        rows.append({"model": model, "engine": label, "op": "verify", "k": k, "ms": 1e3 * _median_s(verify, repeats)})
    engine.release(sid)
    return rows


def _raw_llama_rows(gguf: Path, model: str, ids: list[int], repeats: int) -> list[dict[str, Any]]:
    from llama_cpp import Llama

    threads = os.cpu_count() or 1  # as many as our engine uses (Llama's default decodes on half the cores)
    llm = Llama(str(gguf), n_ctx=1024, n_batch=512, logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    llm.eval(ids)
    base = llm.n_tokens

    def decode() -> None:
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])

    rows = [{"model": model, "engine": "llama-cpp-python Llama", "op": "decode", "k": 1,
             "ms": 1e3 * _median_s(decode, repeats)}]
    for k in BLOCKS:
        def verify(k: int = k) -> None:
            llm.n_tokens = base  # the next eval cuts the cache back to here
            llm.eval(ids[1 : k + 1])

        rows.append({"model": model, "engine": "llama-cpp-python Llama", "op": "verify", "k": k,
                     "ms": 1e3 * _median_s(verify, repeats)})
    return rows


def main(argv: list[str] | None = None) -> None:
    from aiflow_ray.engines.loader import load_engine, resolve_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    prompt = " ".join(p["prompt"] for p in load_prompts(4))
    for model in tqdm(MODELS, desc="engines", unit="model"):
        hf = load_engine(model, engine="hf")
        ids = hf.encode_prompt(prompt, False)[:60]
        rows += _engine_rows(hf, "hf bf16", model, ids, max(args.repeats // 3, 3))
        del hf
        rows += _engine_rows(load_engine(model, engine="llama_cpp"), "llama_cpp (ours)", model, ids, args.repeats)
        rows += _raw_llama_rows(resolve_gguf(model), model, ids, args.repeats)
    out = Path(args.out)
    write_csv(out / "engines.csv", rows)
    labels = list(dict.fromkeys(r["engine"] for r in rows))
    lines = ["# Engine speed (CPU, 2 threads)", "",
             f"Reproduce: `python -m aiflow_ray.bench.engines --repeats {args.repeats}` (about 5 minutes). Median "
             "ms per call on a ~60-token context; verify k = one forward over k new tokens with logits at each.", "",
             "| model | engine | decode | " + " | ".join(f"verify k={k}" for k in BLOCKS) + " |",
             "|---|---|---|" + "---|" * len(BLOCKS)]
    for model in MODELS:
        for label in labels:
            sel = {(r["op"], r["k"]): r["ms"] for r in rows if r["model"] == model and r["engine"] == label}
            lines.append(f"| {model} | {label} | {sel[('decode', 1)]:.1f} | "
                         + " | ".join(f"{sel[('verify', k)]:.1f}" for k in BLOCKS) + " |")
    lines += ["", NOTE]
    (out / "engines.md").write_text("\n".join(lines) + "\n")
    _plot(rows, labels, out / "engines.png")
    print("\n".join(lines))


def _plot(rows: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 4), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        for label in labels:
            pts = sorted((r["k"], r["ms"]) for r in rows if r["model"] == model and r["engine"] == label
                         and r["op"] == "verify")
            ax.plot([k for k, _ in pts], [ms for _, ms in pts], marker="o", label=label)
        ax.set_title(model)
        ax.set_xlabel("tokens verified in one forward (k)")
        ax.set_xscale("log", base=2)
    axes[0].set_ylabel("ms per forward")
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
