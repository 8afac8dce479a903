"""The captioning benchmark's figure: TPOT vs k on the trained pair, TTFT per upload mode, the paper's shapes, the
pair per engine (HF, llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiflow_ray.units import format_bandwidth


def plot(out_dir: Path, fig_rows: list[dict[str, Any]], upload_rows: list[dict[str, Any]],
         paper: list[dict[str, Any]], bandwidths_bps: tuple[float, ...], uploads: tuple[str, ...],
         engine_rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    for bw in bandwidths_bps:
        spec = [r for r in fig_rows if r["bandwidth_bps"] == bw and r["method"] == "speculative"]
        server = next(r for r in fig_rows if r["bandwidth_bps"] == bw and r["method"] == "server-only")
        line = axes[0].plot([r["draft_len"] for r in spec], [r["tpot_s"] * 1e3 for r in spec], marker="o",
                            label=f"speculative {format_bandwidth(bw)}")[0]
        axes[0].plot([r["draft_len"] for r in spec], [r["predicted_tpot_s"] * 1e3 for r in spec], ls=":",
                     color=line.get_color())
        axes[0].axhline(server["tpot_s"] * 1e3, ls="--", color=line.get_color(), lw=0.8)
    axes[0].set(xlabel="draft length k", ylabel="TPOT (ms)", title="trained pair: measured (dots: model), "
                "server-only dashed")
    axes[0].legend(fontsize=7)
    for mode in uploads:
        sub = [r for r in upload_rows if r["upload"] == mode and r["kind"] == "photo"]
        axes[1].plot([r["bandwidth_bps"] / 1e6 for r in sub], [r["ttft_s"] for r in sub], marker="o", ls="",
                     label=mode)
    axes[1].set(xlabel="bandwidth (MB/s)", ylabel="TTFT (s)", yscale="log",
                title="12-MP photo: TTFT per upload mode")
    axes[1].legend(fontsize=7)
    for bw in bandwidths_bps:
        sub = [r for r in paper if r["bandwidth_bps"] == bw]
        axes[2].plot([r["draft_len"] for r in sub], [r["predicted_tpot_s"] * 1e3 for r in sub], marker=".",
                     label=format_bandwidth(bw))
    axes[2].axhline(paper[0]["server_only_tpot_s"] * 1e3, ls="--", color="k", lw=0.8, label="server-only")
    axes[2].set(xlabel="draft length k", ylabel="predicted TPOT (ms)", title="InternVL2-2B -> 26B on an H200 "
                "(predicted)")
    axes[2].legend(fontsize=7)
    pairs = list(dict.fromkeys((r["drafter_engine"], r["verifier_engine"]) for r in engine_rows))
    for drafter, verifier in pairs:
        sub = [r for r in engine_rows if (r["drafter_engine"], r["verifier_engine"]) == (drafter, verifier)]
        spec = [r for r in sub if r["method"] == "speculative"]
        line = axes[3].plot([r["draft_len"] for r in spec], [r["tpot_s"] * 1e3 for r in spec], marker="o",
                            label=f"{drafter} / {verifier}")[0]
        server = next(r for r in sub if r["method"] == "server-only")
        axes[3].axhline(server["tpot_s"] * 1e3, ls="--", color=line.get_color(), lw=0.8)
    axes[3].set(xlabel="draft length k", ylabel="TPOT (ms)", yscale="log",
                title="per engine (drafter / verifier), server-only dashed")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "captioning.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
