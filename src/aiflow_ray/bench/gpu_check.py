"""The GPU check (`make gpu-check`): what one CUDA machine says about the engines, in a few minutes.

    bash scripts/gpu_check.sh                                  # on the GPU machine; results in $OUT
    python -m aiflow_ray.bench.gpu_check --device cpu --quick  # a smoke run of the same code on a CPU

Parts, in order; once ``--budget-s`` is spent the remaining ones are skipped with a message:
1. Exactness on the device: the tiny fp32 pair on the HF engine; greedy speculative decoding (k = 1, 4)
   equals the verifier alone, and a block verify equals step-by-step decoding. With vLLM importable and
   the real weights fetched, the engine conformance suite on vLLM too (`pytest -m vllm`).
2. Forward time of a block of k new tokens on a 512-token KV cache, for the 0.5B and 1.5B shapes with
   random bf16 weights, eager (as HFEngine runs it), static-cache eager, and replayed from a CUDA graph;
   and the draft/verify cost ratio c = t_draft(1) / t_verify(1) per mode.
3. Speculative vs server-only TPOT predicted from those forward times by the project's cost model
   (``speculative.cost_model``), per acceptance and link: predicted, not an end-to-end run.
4. Edge capacity on the 1.5B shape: B sessions verified in one batched forward (B x (k+1) tokens) against
   B decoded (B x 1 token); with vLLM importable and the real weights, ``aiflow_ray.bench.capacity``.
Every number is printed with the device's name; writes gpu.json, gpu.md, gpu.log (and gpu.png) to --out.
Needs torch and transformers, and pydantic for parts 1 and 3 (carried as wheels where nothing can be installed).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aiflow_ray.bench.gpu_shapes import (
    DRAFTER_SHAPE,
    SHAPES,
    VERIFIER_SHAPE,
    Run,
    build_model,
    machine,
    param_count,
    shape_summary,
    time_block,
    write_report,
)
from aiflow_ray.speculative.cost_model import (
    ComputeCosts,
    LinkCosts,
    best_draft_len,
    expected_tokens,
    server_only_tpot_s,
    speculative_tpot_s,
)

EXACT_PROMPTS = ("def fibonacci(n):", "Explain recursion to a child.", "import os\nimport sys\n")
EXACT_DRAFT_LENS = (1, 4)
EXACT_NEW_TOKENS = 24
BLOCK_TOKENS, QUICK_BLOCK_TOKENS = (1, 2, 4, 8, 16, 32), (1, 2, 4)
BATCHES, QUICK_BATCHES = (1, 2, 4, 8, 16), (1, 2)
CAPACITY_DRAFT_LEN = 4
MAX_DRAFT_LEN = 8
REPO_ROOT = Path(__file__).resolve().parents[3]  # the suite and `-m aiflow_ray...` run from the checkout
VLLM_MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
GRAPH_ON_CPU = "CUDA graphs need a CUDA device"
VLLM_ON_CPU = "the vLLM parts of this check run on CUDA only (vLLM's CPU build is covered by `make test`)"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


# -- 1. exactness ------------------------------------------------------------------------------------
def _top2_gap(engine: Any, ids: list[int]) -> float:
    from aiflow_ray.config import SamplingConfig

    engine.open_session("gpu-check-gap", ids)
    try:
        row = engine.score("gpu-check-gap", [], SamplingConfig(), with_logprobs=True).logprobs[0]
    finally:
        engine.release("gpu-check-gap")
    top = sorted(row.tolist())[-2:]
    return round(top[1] - top[0], 4)


def _compare(engine: Any, ids: list[int], got: list[int], want: list[int]) -> dict[str, Any]:
    """Equal, or where the two first part and how near a tie the verifier was there (a kernel-order
    difference can flip only a near-tie)."""
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if first is None and len(got) == len(want):
        return {"equal": True}
    at = first if first is not None else min(len(got), len(want))
    return {"equal": False, "first_difference_at": at, "top2_logprob_gap": _top2_gap(engine, ids + want[:at])}


def exactness(run: Run, prompts: tuple[str, ...]) -> dict[str, Any]:
    from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
    from aiflow_ray.engines.hf import HFEngine
    from aiflow_ray.models.tiny import build_tiny_pair
    from aiflow_ray.tiers.pipeline import Pipeline

    greedy, fast_link = SamplingConfig(), LinkConfig(bandwidth_bps=1e9, rtt_s=0.0, virtual_time=True)
    verifier_dir, drafter_dir = build_tiny_pair()
    device = str(run.device)
    verifier = HFEngine.from_pretrained(verifier_dir, "tiny-verifier", dtype="float32", device=device)
    drafter = HFEngine.from_pretrained(drafter_dir, "tiny-drafter", dtype="float32", device=device)
    pipeline = Pipeline(drafter, verifier)
    rows = []
    for prompt in prompts:
        ids = verifier.encode_prompt(prompt, chat=True)
        reference = pipeline.target_greedy(ids, EXACT_NEW_TOKENS)
        row: dict[str, Any] = {"prompt": prompt, "reference_tokens": len(reference)}
        for k in EXACT_DRAFT_LENS:
            opts = GenerateOptions(prompt=prompt, path="device-edge", draft_len=k, max_new_tokens=EXACT_NEW_TOKENS,
                                   link=fast_link)
            row[f"speculative_k{k}"] = _compare(verifier, ids, pipeline.run(opts).token_ids, reference)
        steps = []  # one token per forward, past any EOS, so that there are always 8
        verifier.open_session("gpu-check-steps", ids)
        for _ in range(8):
            steps.append(verifier.score("gpu-check-steps", [], greedy).greedy_ids[0])  # type: ignore[index]
            verifier.append("gpu-check-steps", steps[-1:])
        verifier.release("gpu-check-steps")
        draft = [*steps[:3], steps[3] ^ 1, *steps[4:7]]  # a rejection at position 4, as the conformance suite
        verifier.open_session("gpu-check-block", ids)
        block = verifier.score("gpu-check-block", draft, greedy).greedy_ids or []
        verifier.release("gpu-check-block")
        row["block_verify"] = _compare(verifier, ids, block[:4], steps[:4])
        rows.append(row)
        run.log(f"exactness {prompt!r}: " + ", ".join(f"{key} {'equal' if v['equal'] else v}"
                                                      for key, v in row.items() if isinstance(v, dict)))
    exact = all(v["equal"] for row in rows for v in row.values() if isinstance(v, dict))
    run.log(f"exactness on {device} (tiny fp32 pair, HF engine): {'all equal' if exact else 'DIFFERENCES'}")
    return {"device": device, "all_equal": exact, "prompts": rows}


def vllm_status() -> tuple[bool, str]:
    """Whether vLLM imports here, tried in a child process: importing it here would start its machinery."""
    if importlib.util.find_spec("vllm") is None:
        return False, "not installed here (no module named vllm)"
    try:
        proc = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return False, "not usable here (its import took over 180 s)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, f"not installed here (import fails: {last[:300]})"
    return True, proc.stdout.strip().splitlines()[-1]


def real_weights() -> str | None:
    """None when the real pair's bf16 weights are fetched, else why not."""
    from aiflow_ray.models.fetch import cached_model_dir, is_cached

    missing = [str(cached_model_dir(name)) for name in VLLM_MODELS if not is_cached(name)]
    return f"the real weights are not fetched (`aiflow models fetch`): missing {', '.join(missing)}" if missing \
        else None


def _subprocess(run: Run, what: str, cmd: list[str]) -> dict[str, Any]:
    run.log(f"{what}: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, run.left_s()), cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        run.log(f"{what}: stopped at the budget")
        return {"command": " ".join(cmd), "error": "stopped at the budget"}
    tail = (proc.stdout + proc.stderr)[-3000:]
    run.log(f"{what}: exit {proc.returncode}; last lines:\n{tail[-800:]}")
    return {"command": " ".join(cmd), "returncode": proc.returncode, "output_tail": tail}


def vllm_conformance(run: Run, vllm: tuple[bool, str]) -> dict[str, Any]:
    if not vllm[0]:
        return {"skipped": f"vllm: {vllm[1]}"}
    missing = real_weights()
    if missing:
        run.log(f"vllm conformance: skipped, {missing}")
        return {"skipped": missing}
    return _subprocess(run, "vllm conformance", [sys.executable, "-m", "pytest", "-q", "-m", "vllm",
                                                 "tests/unit/test_engine_conformance.py"])


# -- 2. forward curves -------------------------------------------------------------------------------
def _modes(run: Run) -> list[str]:
    return ["eager", "static", "graph"] if run.device.type == "cuda" else ["eager", "static"]


def forward_curves(run: Run, quick: bool, context: int, repeats: int, models: dict[str, Any]) -> dict[str, Any]:
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    out: dict[str, Any] = {"context_tokens": context, "repeats": repeats, "dtype": str(dtype).removeprefix("torch."),
                           "forward_ms": {}, "graph_vs_static": {}, "shapes": {}, "errors": []}
    if run.device.type != "cuda":
        out["graph"] = {"skipped": GRAPH_ON_CPU}
    for shape in SHAPES:
        if skipped := run.skip(f"the {shape} curves"):
            out["errors"].append(skipped)
            continue
        model = build_model(shape, run.device, dtype, quick)
        out["shapes"][shape] = {**shape_summary(shape, quick), "params": param_count(model)}
        for mode in _modes(run):
            for tokens in QUICK_BLOCK_TOKENS if quick else BLOCK_TOKENS:
                if skipped := run.skip(f"{shape} {mode} {tokens} tokens"):
                    out["errors"].append(skipped)
                    break
                try:
                    ms, check = time_block(run, model, mode, 1, context, tokens, repeats)
                except Exception as exc:  # a failed capture is reported; the other modes still stand
                    out["errors"].append(f"{shape} {mode} {tokens} tokens: {_error(exc)}")
                    run.log(f"{shape} {mode} {tokens} tokens failed, the rest of this mode skipped: {_error(exc)}")
                    break
                out["forward_ms"].setdefault(shape, {}).setdefault(mode, {})[tokens] = round(ms, 3)
                if check is not None:
                    out["graph_vs_static"].setdefault(shape, {})[tokens] = check
                run.log(f"{shape} {mode}: forward of k={tokens} new tokens on {context} cached: {ms:.2f} ms"
                        + (f" (replay vs eager: {check})" if check else ""))
        models[shape] = model if shape == VERIFIER_SHAPE else None  # the verifier serves part 4 too
        del model
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    ms = out["forward_ms"]
    out["cost_ratio_c"] = {mode: round(ms[DRAFTER_SHAPE][mode][1] / ms[VERIFIER_SHAPE][mode][1], 3)
                           for mode in _modes(run) if 1 in ms.get(DRAFTER_SHAPE, {}).get(mode, {})
                           and 1 in ms.get(VERIFIER_SHAPE, {}).get(mode, {})}
    run.log(f"cost ratio c = t_draft(1) / t_verify(1): {out['cost_ratio_c']} (docs/design.md section 7: 0.86 eager)")
    return out


# -- 3. TPOT predicted by the cost model ---------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredCompute(ComputeCosts):
    """The cost model's compute costs with t_v(k) read off the measured curve (the forward of k+1 tokens,
    linear between measured block sizes) instead of its linear fit: on a GPU the curve is flat, not linear."""

    verify_curve_s: tuple[tuple[int, float], ...] = ()  # (tokens in the block, seconds)

    def verify_s(self, k: int) -> float:
        tokens, curve = k + 1, self.verify_curve_s
        if tokens <= curve[0][0]:
            return curve[0][1]
        for (n0, s0), (n1, s1) in itertools.pairwise(curve):
            if tokens <= n1:
                return s0 + (s1 - s0) * (tokens - n0) / (n1 - n0)
        return curve[-1][1]


def links() -> dict[str, LinkCosts]:
    from aiflow_ray.config import LinkConfig

    default = LinkConfig()  # the project's default link: 1 MB/s, RTT 20 ms
    return {f"{default.bandwidth_bps / 1e6:g} MB/s, RTT {1e3 * default.rtt_s:g} ms":
            LinkCosts(default.rtt_s, default.bandwidth_bps, default.bandwidth_bps),
            "zero-latency link": LinkCosts(0.0, float("inf"), float("inf"))}


def predict_tpot(run: Run, curves: dict[str, Any], alphas: list[float], max_draft_len: int) -> dict[str, Any]:
    from aiflow_ray.network.wire import VERIFY_RESULT_SIZE, verify_request_size

    rows: list[dict[str, Any]] = []
    ms = curves["forward_ms"]
    for mode in _modes(run):
        draft, verify = ms.get(DRAFTER_SHAPE, {}).get(mode, {}), ms.get(VERIFIER_SHAPE, {}).get(mode, {})
        if 1 not in draft or 1 not in verify:
            continue
        curve = tuple((n, verify[n] / 1e3) for n in sorted(verify))
        compute = MeasuredCompute(draft_s_per_token=draft[1] / 1e3, verify_base_s=verify[1] / 1e3,
                                  verify_per_token_s=0.0, verify_curve_s=curve)
        server_s = server_only_tpot_s(compute)
        for alpha in alphas:
            for link_name, link in links().items():
                best_k, spec_s = best_draft_len(alpha, compute, link, verify_request_size, VERIFY_RESULT_SIZE,
                                                max_draft_len)
                by_k = {k: round(1e3 * speculative_tpot_s(k, alpha, compute, link, verify_request_size,
                                                          VERIFY_RESULT_SIZE), 3) for k in range(1, max_draft_len + 1)}
                rows.append({"mode": mode, "alpha": alpha, "link": link_name, "best_draft_len": best_k,
                             "speculative_tpot_ms": round(1e3 * spec_s, 3),
                             "server_only_tpot_ms": round(1e3 * server_s, 3),
                             "server_over_speculative": round(server_s / spec_s, 3), "tpot_ms_by_draft_len": by_k})
                run.log(f"predicted TPOT, {mode}, alpha {alpha}, {link_name}: best k={best_k}, speculative "
                        f"{1e3 * spec_s:.2f} ms vs server-only {1e3 * server_s:.2f} ms, ratio {server_s / spec_s:.2f}")
    return {"note": "predicted from measured forward times with speculative.cost_model; not an end-to-end run",
            "max_draft_len": max_draft_len, "rows": rows}


# -- 4. capacity ------------------------------------------------------------------------------------
def capacity(run: Run, model: Any, quick: bool, context: int, repeats: int, alphas: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": VERIFIER_SHAPE, "draft_len": CAPACITY_DRAFT_LEN, "context_tokens": context,
                           "rows": [], "errors": []}
    if run.device.type != "cuda":
        out["graph"] = {"skipped": GRAPH_ON_CPU}
    if model is None:
        out["errors"].append(f"skipped: no {VERIFIER_SHAPE} model (part 2 did not build it)")
        return out
    for mode in ("eager", "graph") if run.device.type == "cuda" else ("eager",):
        for batch in QUICK_BATCHES if quick else BATCHES:
            if skipped := run.skip(f"capacity {mode} batch {batch}"):
                out["errors"].append(skipped)
                break
            try:
                decode_ms, _ = time_block(run, model, mode, batch, context, 1, repeats)
                verify_ms, _ = time_block(run, model, mode, batch, context, CAPACITY_DRAFT_LEN + 1, repeats)
            except Exception as exc:
                out["errors"].append(f"capacity {mode} batch {batch}: {_error(exc)}")
                run.log(f"capacity {mode} batch {batch} failed, the rest of this mode skipped: {_error(exc)}")
                break
            for alpha in alphas:
                speculative = batch * expected_tokens(CAPACITY_DRAFT_LEN, alpha) / (verify_ms / 1e3)
                server = batch / (decode_ms / 1e3)
                out["rows"].append({"mode": mode, "batch": batch, "alpha": alpha, "decode_ms": round(decode_ms, 3),
                                    "verify_ms": round(verify_ms, 3), "speculative_tokens_per_s": round(speculative, 1),
                                    "server_only_tokens_per_s": round(server, 1),
                                    "speculative_over_server": round(speculative / server, 3)})
                run.log(f"capacity {mode} B={batch} alpha {alpha}: verify {batch}x{CAPACITY_DRAFT_LEN + 1} tokens "
                        f"{verify_ms:.2f} ms, decode {batch}x1 {decode_ms:.2f} ms: {speculative:.0f} vs {server:.0f} "
                        f"tokens/s, ratio {speculative / server:.2f}")
    return out


def vllm_capacity(run: Run, vllm: tuple[bool, str]) -> dict[str, Any]:
    if not vllm[0]:
        return {"skipped": f"vllm: {vllm[1]}"}
    if missing := real_weights():
        run.log(f"vllm capacity: skipped, {missing}")
        return {"skipped": missing}
    usage = subprocess.run([sys.executable, "-m", "aiflow_ray.bench.capacity", "--help"], capture_output=True,
                           text=True, timeout=120).stdout
    out = run.out / "capacity"
    files = ["--out-csv", str(out / "capacity.csv"), "--out-md", str(out / "capacity.md"), "--out-png",
             str(out / "capacity.png")] if "--out-csv" in usage else ["--out", str(out)]
    return _subprocess(run, "vllm capacity", [sys.executable, "-m", "aiflow_ray.bench.capacity", "--engines", "vllm",
                                              "--devices", ",".join(map(str, BATCHES)), *files])


# -- driver ----------------------------------------------------------------------------------------
def _part(run: Run, what: str, part: Callable[[], dict[str, Any]], **empty: Any) -> dict[str, Any]:
    """One part's result, or why there is none: budget spent, or its error (which must not cost the others).
    ``empty`` holds the keys later parts read from it."""
    if skipped := run.skip(what):
        return {"skipped": skipped, **empty}
    try:
        return part()
    except Exception as exc:
        run.log(f"{what} failed: {_error(exc)}")
        return {"error": _error(exc), **empty}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/gpu-run", help="folder for gpu.{json,md,log,png}")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats, blocks to 4, batches to 2")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining parts after this")
    parser.add_argument("--alphas", default="0.7,0.8", help="acceptance rates for the predictions")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per forward (the median is kept)")
    parser.add_argument("--context-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --quick for a smoke run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, device, args.budget_s)
    alphas = [float(a) for a in args.alphas.split(",")]
    repeats, context = (3, 64) if args.quick else (args.repeats, args.context_tokens)
    report: dict[str, Any] = {"machine": machine(run.name, device), "args": vars(args)}
    run.log(f"GPU check on {run.name}: {report['machine']}")
    vllm = vllm_status() if device.type == "cuda" else (False, VLLM_ON_CPU)
    run.log(f"vllm: {vllm[1]}")
    report["vllm"] = {"importable": vllm[0], "detail": vllm[1]}
    on_cuda = device.type == "cuda"
    quick_prompts = EXACT_PROMPTS[:1] if args.quick else EXACT_PROMPTS
    report["exactness"] = _part(run, "exactness", lambda: exactness(run, quick_prompts))
    report["vllm_conformance"] = _part(run, "the vLLM conformance suite", lambda: vllm_conformance(run, vllm))
    models: dict[str, Any] = {}
    report["forward_curves"] = _part(run, "the forward curves",
                                     lambda: forward_curves(run, args.quick, context, repeats, models), forward_ms={})
    max_draft_len = min(MAX_DRAFT_LEN, max(QUICK_BLOCK_TOKENS if args.quick else BLOCK_TOKENS) - 1)
    report["tpot_prediction"] = _part(run, "the TPOT prediction",
                                      lambda: predict_tpot(run, report["forward_curves"], alphas, max_draft_len),
                                      rows=[], max_draft_len=max_draft_len)
    report["capacity"] = _part(run, "capacity", lambda: capacity(run, models.get(VERIFIER_SHAPE), args.quick,
                                                                   context, repeats, alphas), rows=[])
    models.clear()
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()  # vLLM, next, sizes its KV cache by the free memory
    report["capacity"]["vllm"] = _part(run, "the vLLM capacity run", lambda: vllm_capacity(run, vllm))
    report["elapsed_s"] = round(run.elapsed_s(), 1)
    write_report(out, report)
    run.log(f"done in {report['elapsed_s']:.0f} s: wrote {out / 'gpu.json'}, gpu.md, gpu.log, gpu.png")
    return report


if __name__ == "__main__":
    main()
