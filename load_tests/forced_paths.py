"""Concurrent requests on forced paths against a served API: tokens a second over the whole run, and each path's
median seconds a token (a request's whole time over its tokens, waiting included).

    make run && .venv/bin/aiflow deploy --profile local --set edge.autoscaling.max_replicas=1
    .venv/bin/python -m load_tests.forced_paths --streams 4 --paths device-edge
    .venv/bin/python -m load_tests.forced_paths --streams 4 --paths on-device,server-only

How docs/benchmarks/concurrency_default.md measured each change alone (redeploy with ``--set
edge.shared_decodes=false`` and the like between runs). Stream ``i`` sends its ``r``-th request on path
``paths[(i + r) % len(paths)]``, each with a prompt of its own (no prefix shared beyond the chat template).
Bounded: ``--requests-per-stream`` requests per stream, each ``--timeout-s`` at most.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from aiflow_ray import envs

TASKS = ("sorts a list", "reverses a string", "counts words", "merges two dicts", "parses a date", "flattens a list",
         "finds primes", "checks palindromes")


def run(url: str, streams: int, paths: list[str], requests_per_stream: int, max_tokens: int, timeout_s: float,
        key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    done: list[tuple[str, int, float]] = []  # (path, tokens, seconds)
    errors: list[str] = []

    def stream(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as client:
            for r in range(requests_per_stream):
                path = paths[(i + r) % len(paths)]
                prompt = f"Request {i}.{r}: write a Python function that {TASKS[(i + r) % len(TASKS)]}."
                started = time.perf_counter()
                try:
                    reply = client.post("/v1/generate", json={"prompt": prompt, "path": path, "max_tokens": max_tokens})
                    reply.raise_for_status()
                    done.append((path, len(reply.json()["token_ids"]), time.perf_counter() - started))
                except httpx.HTTPError as exc:
                    errors.append(f"{path}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    tokens = sum(n for _, n, _ in done)
    per_path = {p: statistics.median(s / max(n, 1) for q, n, s in done if q == p) for p in paths
                if any(q == p for q, _, _ in done)}
    medians = ", ".join(f"{p} {1e3 * v:.0f} ms a token" for p, v in per_path.items())
    return (f"{streams} streams {','.join(paths)}: {tokens} tokens in {wall_s:.1f} s = {tokens / wall_s:.1f} tokens/s; "
            f"{medians}; {len(errors)} failed" + (f" (first: {errors[0][:200]})" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--paths", default="server-only", help="comma-separated: on-device, server-only, device-edge")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    print(run(args.url, args.streams, args.paths.split(","), args.requests_per_stream, args.max_tokens,
              args.timeout_s, envs.api_key()), flush=True)


if __name__ == "__main__":
    main()
