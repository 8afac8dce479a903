"""The captioning benchmark's engine rows: the trained pair with llama.cpp (libmtmd) as verifier and as both
tiers, beside the HF engine, on held-out scenes at one bandwidth (``bench.captioning`` part 4)."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from aiflow_ray.bench.captioning_common import md_table, median, scene_options, scene_png, tpot_or_nan
from aiflow_ray.bench.tpot import retime_server_only, retime_speculative
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.units import format_bandwidth

log = get_logger("bench.captioning")

ENGINE_PAIRS = (("hf", "hf"), ("hf", "llama_cpp"), ("llama_cpp", "llama_cpp"))  # (drafter, verifier)
ENGINE_BANDWIDTH_BPS = 1e6


def engine_pairs(scenes: list[Any], drafter: str, verifier: str, draft_lens: list[int],
                 max_new: int) -> list[dict[str, Any]]:
    """Server-only and each k on every engine pair of ``ENGINE_PAIRS``, one scene after another."""
    from aiflow_ray.engines.loader import load_engine
    from aiflow_ray.tiers.pipeline import Pipeline

    bw = ENGINE_BANDWIDTH_BPS
    rows: list[dict[str, Any]] = []
    hf_captions: list[list[int]] = []
    for d_engine, v_engine in ENGINE_PAIRS:
        # Two threads each: the in-process pipeline runs one tier at a time, as the HF rows do.
        pipeline = Pipeline(load_engine(drafter, dtype="float32", engine=d_engine, threads=2),  # type: ignore[arg-type]
                            load_engine(verifier, dtype="float32", engine=v_engine, threads=2))  # type: ignore[arg-type]
        runs: dict[int, list[dict[str, Any]]] = {k: [] for k in (0, *draft_lens)}
        bar = tqdm(total=len(scenes) * (1 + len(draft_lens)), desc=f"captioning: {d_engine}/{v_engine}", unit="run")
        for i, scene in enumerate(scenes):
            data = scene_png(scene.image)
            base = pipeline.run(scene_options(data, "server-only", 1, bw, "raw", max_new))
            if v_engine == "hf":
                hf_captions.append(base.token_ids)
            runs[0].append({"tpot_s": tpot_or_nan(retime_server_only(base.trace, bw, bw)), "identical": True,
                            "correct": base.text.strip() == scene.caption,
                            "same_as_hf": base.token_ids == hf_captions[i], "acceptance_rate": float("nan")})
            bar.update(1)
            for k in draft_lens:
                result = pipeline.run(scene_options(data, "device-edge", k, bw, "raw", max_new))
                runs[k].append({"tpot_s": tpot_or_nan(retime_speculative(result.trace, bw, bw)),
                                "identical": result.token_ids == base.token_ids,
                                "correct": result.text.strip() == scene.caption,
                                "same_as_hf": result.token_ids == hf_captions[i],
                                "acceptance_rate": result.trace.acceptance_rate})
                bar.update(1)
        bar.close()
        server_tpot_s = median([r["tpot_s"] for r in runs[0]])
        for k, done in runs.items():
            tpot_s = median([r["tpot_s"] for r in done])
            rows.append({"drafter_engine": d_engine, "verifier_engine": v_engine, "bandwidth_bps": bw,
                         "method": "server-only" if k == 0 else "speculative", "draft_len": k, "tpot_s": tpot_s,
                         "tpot_ratio_vs_server_only": tpot_s / server_tpot_s,
                         "caption_accuracy": sum(r["correct"] for r in done) / len(done),
                         "identical_share": sum(r["identical"] for r in done) / len(done),
                         "same_as_hf_share": sum(r["same_as_hf"] for r in done) / len(done),
                         "acceptance_rate": float(np.nanmean([r["acceptance_rate"] for r in done])) if k else
                         float("nan"), "num_scenes": len(done)})
        log.info("engines %s/%s: server-only TPOT %.2f ms", d_engine, v_engine, server_tpot_s * 1e3)
    return rows



def engines_markdown(engine_rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Engines: llama.cpp beside the HF engine", "",
              f"The same pair and the first {engine_rows[0]['num_scenes']} held-out scenes at "
              f"{format_bandwidth(ENGINE_BANDWIDTH_BPS)}, with llama.cpp (libmtmd; the checkpoints converted by "
              "llama.cpp's own converter, f32) as the verifier and as both tiers. Two threads an engine, one tier "
              "computing at a time. 'identical' compares with the same engines' server-only caption (greedy "
              "speculative output must equal it), 'same as HF' with the HF verifier's server-only caption (f32 "
              "kernels of two libraries: they may part only at near-ties).", ""]
    table = [["drafter / verifier", "method", "k", "TPOT ms", "TPOT / server-only", "acceptance", "caption accuracy",
              "identical to server-only", "same as HF"]]
    for r in engine_rows:
        table.append([f"{r['drafter_engine']} / {r['verifier_engine']}", r["method"], str(r["draft_len"]),
                      f"{r['tpot_s'] * 1e3:.2f}", f"{r['tpot_ratio_vs_server_only']:.2f}",
                      "" if r["method"] == "server-only" else f"{r['acceptance_rate']:.3f}",
                      f"{r['caption_accuracy']:.1%}", f"{r['identical_share']:.0%}", f"{r['same_as_hf_share']:.0%}"])
    lines += [md_table(table), ""]
    server = {(r["drafter_engine"], r["verifier_engine"]): r["tpot_s"] for r in engine_rows if r["draft_len"] == 0}
    lines += [f"llama.cpp computes the verifier's token {server[('hf', 'hf')] / server[('hf', 'llama_cpp')]:.1f}x "
              "faster than the HF engine, and server-only follows; speculation does not, since a round here is "
              "bounded by the link's round trip (20 ms) and not by the verifier's forward. The exactness does "
              "carry over: llama.cpp's verifier writes the HF verifier's captions, and the speculative output "
              "equals its own server-only output.", ""]
    return lines
