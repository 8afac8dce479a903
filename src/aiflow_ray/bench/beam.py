"""The cloud tier's beam search per engine: transformers' (HF bf16) vs ours on llama.cpp sequences.

    python -m aiflow_ray.bench.beam      # writes docs/benchmarks/beam.{csv,md,png} (about 5 minutes)

Same 1.5B verifier, same grounded-style prompts, widths 1-8, interleaved per prompt so that the two
engines see the same machine. Both return the better of the beam result and the greedy path. Reported:
compute per generated token, and the objective (mean log-probability per token, the model's own on each
engine) so that speed is not bought with worse answers.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.engines.beam import beam_search
from aiflow_ray.engines.loader import load_engine

MODEL = "qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    "Using the passages, explain what a context manager does in Python and how the with statement uses it.",
    "Answer from the passages: what is a closure, and when does a nested function capture a variable?",
    "Summarise what the passages say about generators and the yield statement.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1,2,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    engines = {"hf": load_engine(MODEL), "llama_cpp": load_engine(MODEL, engine="llama_cpp", beams=True)}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(PROMPTS) * len(widths) * len(engines), desc="beam search", unit="run")
    for i, prompt in enumerate(PROMPTS):
        for width in widths:
            for name, engine in engines.items():
                result = beam_search(engine, engine.encode_prompt(prompt, True), width, args.max_new_tokens)
                n = max(len(result.token_ids), 1)
                rows.append({"engine": name, "width": width, "prompt": i, "tokens": len(result.token_ids),
                             "ms_per_token": 1e3 * result.compute_s / n, "mean_logprob": result.sum_logprob / n})
                bar.update(1)
    bar.close()
    out = Path(args.out)
    write_csv(out / "beam.csv", rows)

    def med(engine: str, width: int, key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r["engine"] == engine and r["width"] == width)

    lines = ["# Cloud beam search per engine (1.5B verifier, CPU, 2 threads)", "",
             f"Reproduce: `python -m aiflow_ray.bench.beam` ({len(PROMPTS)} grounded-style prompts, "
             f"{args.max_new_tokens} tokens, medians; both engines return the better of beam and greedy).", "",
             "| width | HF ms/token | llama.cpp ms/token | HF / llama.cpp | HF mean logprob | llama.cpp mean logprob |",
             "|---|---|---|---|---|---|"]
    for width in widths:
        hf, lc = med("hf", width, "ms_per_token"), med("llama_cpp", width, "ms_per_token")
        lines.append(f"| {width} | {hf:.0f} | {lc:.0f} | {hf / lc:.2f}x | {med('hf', width, 'mean_logprob'):.3f} | "
                     f"{med('llama_cpp', width, 'mean_logprob'):.3f} |")
    lines += ["", "Each llama.cpp step evaluates every live beam and the greedy path in one decode (one token per "
              "sequence); beams share their prefix's KV cells. The local profile's cloud runs llama.cpp for this. "
              "Log-probabilities are each engine's own (bf16 vs Q4_K_M weights), so compare them within a column."]
    (out / "beam.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in engines:
        ax.plot(widths, [med(name, w, "ms_per_token") for w in widths], marker="o", label=name)
    ax.set_xlabel("beam width")
    ax.set_ylabel("ms per generated token")
    ax.set_title("Cloud beam search, 1.5B on 2 CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "beam.png", dpi=120)


if __name__ == "__main__":
    main()
