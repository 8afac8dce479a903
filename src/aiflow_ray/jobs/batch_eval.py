"""Batch evaluation over a prompt file: JSONL in, JSONL + summary out, progress reported.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m aiflow_ray.jobs.batch_eval --input prompts.jsonl --output results.jsonl

Each input line is ``{"id": ..., "prompt": ..., <any /v1/generate field>}``; a bad line is recorded
as an error in the output, not fatal. The summary (counts, paths, median TTFT/TPOT, acceptance) is
written next to the output as ``<output>.summary.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aiflow_ray.client import AiflowClient


def run(input_path: Path, output_path: Path, url: str, defaults: dict[str, Any]) -> dict[str, Any]:
    lines = [line for line in input_path.read_text().splitlines() if line.strip()]
    client = AiflowClient(url)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w") as out:
        for number, line in enumerate(tqdm(lines, desc="batch eval", unit="prompt", file=sys.stdout), start=1):
            record: dict[str, Any] = {"line": number}
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or "prompt" not in item:
                    raise ValueError("each line must be a JSON object with a 'prompt'")
                record["id"] = item.pop("id", number)
                body = {**defaults, **item}
                result = client.generate(**body)
                record.update(text=result["text"], num_tokens=len(result["token_ids"]), trace=result["trace"])
            except Exception as exc:
                record["error"] = str(exc)
            out.write(json.dumps(record) + "\n")
            out.flush()
            results.append(record)
    ok = [r for r in results if "error" not in r]
    traces = [r["trace"] for r in ok]

    def median(key: str) -> float | None:
        values = [t[key] for t in traces if isinstance(t.get(key), int | float)]
        return statistics.median(values) if values else None

    summary = {
        "input": str(input_path), "output": str(output_path), "requests": len(results), "ok": len(ok),
        "errors": len(results) - len(ok), "paths": dict(Counter(t["path"] for t in traces)),
        "median_ttft_s": median("ttft_s"), "median_tpot_s": median("tpot_s"),
        "median_acceptance_rate": median("acceptance_rate"), "wall_s": time.perf_counter() - started,
    }
    output_path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=None, help="prompt JSONL (default: the bundled prompts)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--path", default="auto")
    parser.add_argument("--quality", default="exact")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is None:
        from aiflow_ray.data import load_prompts

        args.input = args.output.parent / "prompts.jsonl"
        args.input.parent.mkdir(parents=True, exist_ok=True)
        bundled = [json.dumps({"id": p["id"], "prompt": p["prompt"]}) for p in load_prompts()]
        args.input.write_text("\n".join(bundled) + "\n")
    summary = run(args.input, args.output, args.url,
                  {"max_tokens": args.max_tokens, "path": args.path, "quality": args.quality})
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
