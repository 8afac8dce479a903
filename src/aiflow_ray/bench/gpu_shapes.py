"""The measuring and reporting half of ``aiflow_ray.bench.gpu_check``.

Forward time of the real model shapes (random weights) for a block of new tokens on a KV cache, in three
ways to run the same block forward:
- ``eager``: as ``HFEngine`` runs it, a ``DynamicCache`` grown by the block and cropped back after it;
- ``static``: a ``StaticCache`` written in place, still launched op by op from Python;
- ``graph``: that static forward captured once in a CUDA graph and replayed (CUDA only), which removes
  the per-kernel launch cost the way vLLM's CUDA graphs do.
``static`` sits between the two: against ``graph`` it isolates the launch overhead, against ``eager`` the
cost of the cache layout. Weights are random: timing does not depend on their values.
``write_report`` turns the check's results into gpu.json, gpu.md and gpu.png.
"""

from __future__ import annotations

import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIGS_DIR = Path(__file__).parent / "model_configs"
DRAFTER_SHAPE, VERIFIER_SHAPE = "0.5b", "1.5b"  # Qwen2.5-Coder 0.5B / 1.5B Instruct, the default pair
SHAPES = (DRAFTER_SHAPE, VERIFIER_SHAPE)
MODES = ("eager", "static", "graph")
# --quick on a CPU: the same architecture scaled down so that a smoke run takes seconds, not minutes.
QUICK_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1024, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1}
WARMUP_CALLS = 3  # CUDA graphs need a few eager calls on a side stream before capture, and so do allocators


def load_config(shape: str, quick: bool) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(CONFIGS_DIR / f"{shape}.json"))
    if quick:
        for key, value in QUICK_SHAPE.items():
            setattr(config, key, value)
        config.layer_types = ["full_attention"] * config.num_hidden_layers  # must match the layer count
    return config


def build_model(shape: str, device: torch.device, dtype: torch.dtype, quick: bool) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1.5B init on the host takes far longer
        model = AutoModelForCausalLM.from_config(load_config(shape, quick), dtype=dtype)
    return model.eval()


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


class BlockForward:
    """One forward of ``batch`` x ``block_tokens`` new tokens on a cache already holding ``context_tokens``
    per row, in one of ``MODES``. Every call computes the same positions (the cache is put back to the
    context before or after it), so calls can be repeated and timed."""

    def __init__(self, model: Any, mode: str, batch: int, context_tokens: int, block_tokens: int) -> None:
        from transformers import DynamicCache, StaticCache

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.model, self.mode = model, mode
        self.context_tokens, self.block_tokens = context_tokens, block_tokens
        device = next(model.parameters()).device
        if mode == "graph" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(batch * 1000 + block_tokens)
        prefill = torch.randint(0, vocab, (batch, context_tokens), generator=generator).to(device)
        self.ids = torch.randint(0, vocab, (batch, block_tokens), generator=generator).to(device)
        self.positions = torch.arange(context_tokens, context_tokens + block_tokens, device=device)[None, :]
        # Older transformers releases place static-cache writes by `cache_position`; 5.17 and 5.19 by a
        # per-layer counter (reset before every call, below) and no longer take the argument.
        takes_cache_position = "cache_position" in inspect.signature(model.model.forward).parameters
        self.cache: Any
        if mode == "eager":
            self.cache = DynamicCache(config=model.config)
        else:
            self.cache = StaticCache(config=model.config, max_cache_len=context_tokens + block_tokens)
        self.extra: dict[str, Any] = {}
        prefill_extra: dict[str, Any] = {}
        if mode != "eager":
            # A ready 4-D mask (query i sees cache slots up to context + i) skips transformers' mask builder,
            # which reads tensor values on the host for some shapes, and a host read cannot be captured.
            slots = torch.arange(context_tokens + block_tokens, device=device)
            allowed = slots[None, :] <= self.positions[0][:, None]  # [block, slots]
            self.extra["attention_mask"] = allowed[None, None].expand(batch, 1, -1, -1)
            if takes_cache_position:
                self.extra["cache_position"] = self.positions[0]
                prefill_extra = {"cache_position": torch.arange(context_tokens, device=device)}
        self.graph: Any = None
        self.out: torch.Tensor | None = None
        with torch.inference_mode():
            model(input_ids=prefill, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                  position_ids=torch.arange(context_tokens, device=device)[None, :], **prefill_extra)
            # The counters exist (and sit on the device) only once the prefill initialised the layers.
            self.counters = [layer.cumulative_length for layer in getattr(self.cache, "layers", [])
                             if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
            if mode != "eager" and not self.counters and not takes_cache_position:
                # Repeated calls would write past the cache's end: on CUDA a device-side assert, which ends
                # every later part of the check too.
                raise RuntimeError("this transformers' StaticCache has no write position the check can pin")
            if mode == "graph":
                self._capture()

    def _static_forward(self) -> torch.Tensor:
        if self.counters:  # write the block at the context's end on every call, replays included
            torch._foreach_zero_(self.counters)
            torch._foreach_add_(self.counters, self.context_tokens)
        return self.model(input_ids=self.ids, past_key_values=self.cache, position_ids=self.positions,
                          use_cache=True, logits_to_keep=self.block_tokens, **self.extra).logits

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._static_forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._static_forward()

    def __call__(self) -> torch.Tensor:
        """Logits [batch, block_tokens, vocab]; a graph returns the same output buffer on every replay."""
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out
        with torch.inference_mode():
            if self.mode == "static":
                return self._static_forward()
            logits = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True,
                                logits_to_keep=self.block_tokens).logits
            self.cache.crop(-self.block_tokens)  # negative: drop that many tokens, back to the context
            return logits


def median_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``call`` in ms after warm-up. On CUDA each call is bracketed by synchronisation, so
    that a call counts from its first launch to the end of its GPU work: Python's launch cost included, as an
    engine pays it, and no overlap with the next call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_CALLS):
        call()
    times_ms = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        call()
        sync()
        times_ms.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times_ms)


class Run:
    """The device, the log (console and gpu.log, every line with the device's name) and the time budget."""

    def __init__(self, out: Path, device: torch.device, budget_s: float) -> None:
        self.out, self.device, self.budget_s = out, device, budget_s
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.started = time.monotonic()
        self._log = (out / "gpu.log").open("w")

    def log(self, message: str) -> None:
        line = f"[{self.name}] {message}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s()

    def skip(self, what: str) -> str | None:
        """A skip message once the budget is spent (logged), else None."""
        if self.left_s() > 0:
            return None
        message = f"skipped: the budget of {self.budget_s:.0f} s was spent before {what}"
        self.log(message)
        return message


def time_block(run: Run, model: Any, mode: str, batch: int, context: int, tokens: int, repeats: int
                ) -> tuple[float, dict[str, Any] | None]:
    """Median ms of one block forward; for a graph also whether its replay computes what the eager
    static forward computes (a capture that silently recorded nothing would be fast and wrong)."""
    forward = BlockForward(model, mode, batch, context, tokens)
    ms = median_ms(forward, run.device, repeats)
    check = None
    if mode == "graph":
        replayed = forward().clone()
        with torch.inference_mode():
            check = same_logits(replayed, forward._static_forward())
    return ms, check


def same_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Whether two runs of one forward agree: same argmax at every position, and the largest difference."""
    a32, b32 = a.float(), b.float()
    return {"argmax_equal_fraction": round(float((a32.argmax(-1) == b32.argmax(-1)).float().mean().item()), 4),
            "max_abs_logit_diff": round(float((a32 - b32).abs().max().item()), 4)}


def shape_summary(shape: str, quick: bool) -> dict[str, Any]:
    config = load_config(shape, quick)
    return {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "kv_heads": config.num_key_value_heads,
            "source": json.loads((CONFIGS_DIR / f"{shape}.json").read_text()).get("_model_name_or_path", shape)}


# -- the report ---------------------------------------------------------------------------------------
def machine(name: str, device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda,
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def _status(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return str(result["skipped"])
    if "error" in result:
        return f"failed: {result['error']}"
    return f"exit {result.get('returncode')} (`{result.get('command')}`; tail in gpu.json)"


def _note(part: dict[str, Any]) -> str:
    """What a part's table leaves out: a skipped graph mode, the part's own skip or error."""
    notes = [f"graph: {_status(part['graph'])}" if "graph" in part else ""]
    notes += [_status(part) if "skipped" in part or "error" in part else ""]
    return "; ".join(note for note in notes if note)


def _verdict(check: dict[str, Any]) -> str:
    if check["equal"]:
        return "equal"
    return f"differs at token {check['first_difference_at']} (top-2 log-prob gap {check['top2_logprob_gap']})"


def _markdown(report: dict[str, Any]) -> list[str]:
    m, ex, fc, tp, cap = (report[key] for key in ("machine", "exactness", "forward_curves", "tpot_prediction",
                                                  "capacity"))
    lines = [f"# GPU check on {m['device']}", "",
             f"{m['date']}; torch {m['torch']}, transformers {m['transformers']}"
             + (f", CUDA {m['cuda']}, {m['memory_gib']} GiB" if "cuda" in m else "")
             + f"; {report['elapsed_s']} s. Reproduce: `make gpu-check` (see docs/benchmarks/gpu.md).", "",
             f"## 1. Exactness on {m['device']} (tiny fp32 pair, HF engine)", ""]
    if "prompts" in ex:
        keys = [key for key, value in ex["prompts"][0].items() if isinstance(value, dict)]
        lines += ["| prompt | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {row['prompt']!r} | " + " | ".join(_verdict(row[key]) for key in keys) + " |"
                  for row in ex["prompts"]]
    else:
        lines.append(_status(ex))
    lines += ["", f"vLLM conformance suite: {_status(report['vllm_conformance'])}", "",
              f"## 2. Forward time (ms) of a block of k new tokens on a {fc.get('context_tokens')}-token KV cache",
              "", f"{m['device']}, {fc.get('dtype')}, random weights, median of {fc.get('repeats')} timed calls. "
              "eager: DynamicCache as HFEngine runs it; static: StaticCache, eager; graph: that static forward "
              "replayed from a CUDA graph.", ""]
    blocks = sorted({int(k) for modes in fc.get("forward_ms", {}).values() for ms in modes.values() for k in ms})
    lines += ["| shape | mode | " + " | ".join(f"k={k}" for k in blocks) + " |", "|---|---|" + "---|" * len(blocks)]
    for shape, modes in fc.get("forward_ms", {}).items():
        for mode, ms in modes.items():
            cells = [f"{ms[k]:.2f}" if k in ms else "" for k in blocks]
            lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    ratios = ", ".join(f"{mode} {c}" for mode, c in fc.get("cost_ratio_c", {}).items()) or "not measured"
    lines += ["", f"Cost ratio c = t_draft(1) / t_verify(1): {ratios} (docs/design.md section 7 measured 0.86 "
              "eager)."]
    checks = [c for by_k in fc.get("graph_vs_static", {}).values() for c in by_k.values()]
    if checks:
        lines.append(f"Graph replay vs the eager static forward: argmax agreement >= "
                     f"{min(c['argmax_equal_fraction'] for c in checks)}, max |logit diff| "
                     f"{max(c['max_abs_logit_diff'] for c in checks)}.")
    lines += [f"- {note}" for note in [_note(fc), *fc.get("errors", [])] if note]
    lines += ["", "## 3. Speculative vs server-only TPOT, predicted", "",
              "Predicted from the measured forward times by speculative.cost_model, not an end-to-end run: "
              f"t_d = the 0.5B's 1-token forward, t_v(k) = the 1.5B's (k+1)-token forward (linear "
              f"between measured block sizes), k = 1..{tp['max_draft_len']}, on {m['device']}.", "",
              "| mode | alpha | link | best k | speculative TPOT ms | server-only TPOT ms | server / speculative |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['alpha']} | {r['link']} | {r['best_draft_len']} | {r['speculative_tpot_ms']:.2f} | "
              f"{r['server_only_tpot_ms']:.2f} | {r['server_over_speculative']:.2f} |" for r in tp["rows"]]
    lines += [f"- {note}" for note in [_note(tp)] if note]
    lines += ["", f"## 4. Edge capacity, {cap.get('shape')} shape, k = {cap.get('draft_len')}", "",
              f"{m['device']}: B sessions verified in one forward of B x (k+1) tokens vs B decoded in one forward of "
              "B x 1; tokens/s = B x E[tokens per round] / t_verify(B) vs B / t_decode(B) (predicted from forwards).",
              "", "| mode | B | decode ms | verify ms | alpha | speculative tok/s | server-only tok/s | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['batch']} | {r['decode_ms']:.2f} | {r['verify_ms']:.2f} | {r['alpha']} | "
              f"{r['speculative_tokens_per_s']:.0f} | {r['server_only_tokens_per_s']:.0f} | "
              f"{r['speculative_over_server']:.2f} |" for r in cap.get("rows", [])]
    lines += [f"- {note}" for note in [_note(cap), *cap.get("errors", [])] if note]
    lines += ["", f"Measured with vLLM (`aiflow_ray.bench.capacity`): {_status(cap.get('vllm', {}))}"]
    return lines


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for shape, modes in report["forward_curves"].get("forward_ms", {}).items():
        for mode, ms in modes.items():
            left.plot(list(ms), list(ms.values()), marker="o", label=f"{shape} {mode}")
    left.set(xlabel="new tokens in the block (k)", ylabel="ms per forward",
             title=f"forward on a KV cache, {report['machine']['device']}")
    for mode in dict.fromkeys(r["mode"] for r in report["capacity"].get("rows", [])):
        for alpha in dict.fromkeys(r["alpha"] for r in report["capacity"]["rows"]):
            pts = [(r["batch"], r["speculative_over_server"]) for r in report["capacity"]["rows"]
                   if r["mode"] == mode and r["alpha"] == alpha]
            right.plot(*zip(*pts, strict=True), marker="o", label=f"{mode}, alpha {alpha}")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="sessions B", ylabel="speculative / server-only tokens/s", title="edge capacity (predicted)")
    for ax in (left, right):  # powers of two, labelled as plain numbers
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    try:
        markdown = "\n".join(_markdown(report)) + "\n"
    except Exception as exc:  # gpu.json, written first, holds every number anyway
        markdown = f"# GPU check\n\nThe tables could not be rendered ({type(exc).__name__}: {exc}); see gpu.json.\n"
    (out / "gpu.md").write_text(markdown)
    try:
        _plot(report, out / "gpu.png")
    except Exception as exc:  # a missing matplotlib costs the figure only
        print(f"no gpu.png: {type(exc).__name__}: {exc}", flush=True)
