"""The GPU check (`make gpu-check`) on this CPU: its quick mode end to end, and the pieces a GPU run relies on
that a CPU can still vouch for (the static-cache forward that CUDA graphs capture, the cost-model adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aiflow_ray.bench import gpu_check
from aiflow_ray.bench.gpu_shapes import VERIFIER_SHAPE, BlockForward, build_model
from aiflow_ray.speculative.cost_model import LinkCosts, best_draft_len, server_only_tpot_s

SECTIONS = ("machine", "vllm", "exactness", "vllm_conformance", "forward_curves", "tpot_prediction", "capacity")


@pytest.mark.slow
def test_quick_cpu_run_reports_every_section(tmp_path: Path) -> None:
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert all(section in report for section in SECTIONS)
    assert report["exactness"]["all_equal"] is True
    curves = report["forward_curves"]
    for shape in ("0.5b", "1.5b"):
        for mode in ("eager", "static"):
            assert set(curves["forward_ms"][shape][mode]) == {"1", "2", "4"}
    assert set(curves["cost_ratio_c"]) == {"eager", "static"}
    rows = report["tpot_prediction"]["rows"]
    assert {(r["mode"], r["alpha"]) for r in rows} == {(m, a) for m in ("eager", "static") for a in (0.7, 0.8)}
    assert all(1 <= r["best_draft_len"] <= 3 and r["server_over_speculative"] > 0 for r in rows)
    assert {(r["batch"], r["alpha"]) for r in report["capacity"]["rows"]} == {(1, 0.7), (1, 0.8), (2, 0.7), (2, 0.8)}
    # What needs CUDA says it was skipped, and why.
    assert "CUDA" in curves["graph"]["skipped"] and "CUDA" in report["capacity"]["graph"]["skipped"]
    for part in (report["vllm_conformance"], report["capacity"]["vllm"]):
        assert "CUDA only" in part["skipped"]
    markdown = (tmp_path / "gpu.md").read_text()
    assert all(f"## {n}." in markdown for n in range(1, 5)) and "not an end-to-end run" in markdown
    log = (tmp_path / "gpu.log").read_text().splitlines()
    assert log and all(line.startswith("[cpu] ") for line in log)


def test_a_spent_budget_skips_every_part_and_still_writes_the_report(tmp_path: Path) -> None:
    report = gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path)])
    for part in (report["exactness"], report["vllm_conformance"], report["forward_curves"], report["capacity"]):
        assert "skipped" in part
    assert "budget" in report["exactness"]["skipped"]
    assert json.loads((tmp_path / "gpu.json").read_text())["forward_curves"]["forward_ms"] == {}


@pytest.fixture(scope="module")
def small_verifier() -> object:
    return build_model(VERIFIER_SHAPE, torch.device("cpu"), torch.float32, quick=True)


@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (2, 5)])
def test_static_forward_equals_the_engines_dynamic_cache_forward_on_every_call(small_verifier: object, batch: int,
                                                                              tokens: int) -> None:
    """The captured forward must compute what HFEngine computes, at the same positions on every call (replays
    included): transformers advances a static cache's write position by itself, and the check puts it back."""
    eager = BlockForward(small_verifier, "eager", batch, 24, tokens)
    static = BlockForward(small_verifier, "static", batch, 24, tokens)
    reference = eager().clone()
    for _ in range(3):
        torch.testing.assert_close(static(), reference)
        torch.testing.assert_close(eager(), reference)


def test_static_forward_reads_no_tensor_value_on_the_host() -> None:
    """A CUDA graph cannot capture a host read of a device tensor (`.item()`, `if tensor:`). On the meta device
    every such read raises, so a forward that runs there is free of them in this transformers version."""
    model = build_model(VERIFIER_SHAPE, torch.device("meta"), torch.float32, quick=True)
    logits = BlockForward(model, "static", 2, 16, 4)()
    assert logits.shape == (2, 4, model.config.vocab_size)


def test_measured_compute_reads_verify_time_off_the_curve() -> None:
    curve = ((1, 0.010), (2, 0.011), (4, 0.012), (8, 0.016))
    compute = gpu_check.MeasuredCompute(draft_s_per_token=0.001, verify_base_s=0.010, verify_per_token_s=0.0,
                                        verify_curve_s=curve)
    assert server_only_tpot_s(compute) == 0.010  # k = 0: one token per forward
    assert compute.verify_s(1) == 0.011  # k = 1 verifies 2 tokens
    assert compute.verify_s(2) == pytest.approx(0.0115)  # 3 tokens: halfway between 2 and 4
    assert compute.verify_s(20) == 0.016  # past the curve: its last point
    free_link = LinkCosts(0.0, float("inf"), float("inf"))
    k, tpot_s = best_draft_len(0.99, compute, free_link, lambda n: 0, 0, max_k=7)  # cheap drafts, all accepted
    assert k == 7 and tpot_s < server_only_tpot_s(compute)
    with pytest.raises(ValueError):
        BlockForward(build_model(VERIFIER_SHAPE, torch.device("cpu"), torch.float32, quick=True), "graph", 1, 8, 1)
