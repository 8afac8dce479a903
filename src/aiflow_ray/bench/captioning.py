"""Image captioning across the device-edge link: the paper's case, measured on the trained pair.

    python -m aiflow_ray.bench.captioning                      # ~10 min on 2 cores
    python -m aiflow_ray.bench.captioning --scenes 6 --photos 1 --draft-lens 1,4   # smoke run

Three parts, written to ``captioning.{csv,md,png}`` and ``captioning_uploads.csv``:
1. **TPOT vs draft length** (the paper's Fig. 6) on held-out Fashion-MNIST scenes: server-only with the raw
   image uploaded, and speculative decoding at each fixed draft length, at 500 KB/s, 1 MB/s and 2 MB/s.
   Links run on a virtual clock (compute timed for real, link delays added without waiting); a run is done
   once and re-timed for the other bandwidths from the bytes it moved (``bench.tpot``'s method). Each
   speculative caption is checked against the server-only one, and the verifier's caption against the scene's.
2. **Upload modes** (raw, resized, jpeg, features) on camera-sized photographs (scikit-image's, upscaled to
   4032 x 3024 and saved as JPEG, as a phone would) and on held-out scenes: device-link bytes, TTFT on the
   device-edge path, agreement of the output with the raw upload's, and the cost model's TTFT beside each.
   Also the bytes InternVL's released preprocessing (448 px tiles, up to 12 plus a thumbnail) would send.
3. **The paper's shapes predicted**: InternVL2-2B drafting for InternVL2-26B, from GPU forward times
   measured on an H200 (docs/design.md) and the acceptance measured on the trained pair.
4. **Engines**: the same pair with llama.cpp (libmtmd, the checkpoints converted by llama.cpp's converter, f32)
   as verifier and as both tiers, beside the HF engine, at 1 MB/s on held-out scenes: caption accuracy, TPOT,
   and agreement with the same engines' server-only caption and with the HF verifier's
   (``captioning_engines.csv``).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from aiflow_ray.bench.captioning_common import RTT_S, md_table, median, scene_options, scene_png, tpot_or_nan
from aiflow_ray.bench.captioning_engines import engine_pairs, engines_markdown
from aiflow_ray.bench.tpot import retime_server_only, retime_speculative
from aiflow_ray.config import ModelPairConfig
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network.wire import VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.speculative.cost_model import ComputeCosts, LinkCosts, expected_tokens, speculative_tpot_s
from aiflow_ray.tiers.images import prepare_image, stack_tiles
from aiflow_ray.units import format_bandwidth, parse_int_ranges
from aiflow_ray.vision.decode import ImageLimits, encode_png
from aiflow_ray.vision.preprocess import IMAGENET_MEAN, IMAGENET_STD, VisionSpec, image_tiles

log = get_logger("bench.captioning")

BANDWIDTHS_BPS = (500e3, 1e6, 2e6)
PHOTOS = ("motorcycle_left.png", "rocket.jpg", "astronaut.png", "coffee.png")
CAMERA_SIZE = (4032, 3024)  # 12.2 megapixels, a phone's main camera
UPLOADS = ("raw", "resized", "jpeg", "features")
UPLOAD_ROWS = (*UPLOADS, "auto")
# InternVL's released preprocessing, for the bytes it would send (no model needed).
INTERNVL_RELEASED = VisionSpec(tile_size=448, tokens_per_tile=256, crop_to_patches=True, min_tiles=1, max_tiles=12,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD)
# Forward times (ms) on one H200, HF eager bf16, 512-token context, for a block of k new tokens (docs/design.md).
GPU_CURVES_MS = {"InternLM2-1.8B": {1: 15.5, 4: 26.1, 16: 25.9, 32: 26.1},
                 "InternLM2-20B": {1: 32.7, 4: 34.1, 16: 40.3, 32: 36.9}}


def camera_photo(name: str) -> bytes:
    """A scikit-image photograph upscaled to a 12-megapixel JPEG (quality 92), as a phone camera saves it."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    image = Image.open(path).convert("RGB").resize(CAMERA_SIZE, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def interp_ms(curve: dict[int, float], k: int) -> float:
    points = sorted(curve)
    return float(np.interp(k, points, [curve[p] for p in points]))


def fig6(pipeline: Any, scenes: list[Any], draft_lens: list[int], max_new: int) -> tuple[list[dict[str, Any]],
                                                                                       dict[str, float]]:
    """Per-scene records of server-only and each fixed k at every bandwidth; the pair's measured figures."""
    records: list[dict[str, Any]] = []
    base_bw = BANDWIDTHS_BPS[0]
    correct = 0
    draft_s: list[float] = []
    verify_s: list[float] = []
    accepted = drafted = rejections = 0
    server_tpot: list[float] = []
    bar = tqdm(total=len(scenes) * (1 + len(draft_lens)), desc="captioning: TPOT vs k", unit="run")
    for i, scene in enumerate(scenes):
        data = scene_png(scene.image)
        base = pipeline.run(scene_options(data, "server-only", 1, base_bw, "raw", max_new))
        correct += base.text.strip() == scene.caption
        server_tpot.append(base.trace.tpot_s)
        for bw in BANDWIDTHS_BPS:
            times = retime_server_only(base.trace, base_bw, bw)
            records.append({"scene": i, "method": "server-only", "draft_len": 0, "bandwidth_bps": bw,
                            "tpot_s": tpot_or_nan(times), "ttft_s": times[0], "per_token_s": times[-1] / len(times),
                            "identical": True, "acceptance_rate": float("nan")})
        bar.update(1)
        for k in draft_lens:
            result = pipeline.run(scene_options(data, "device-edge", k, base_bw, "raw", max_new))
            trace = result.trace
            accepted += sum(trace.accepted)
            drafted += sum(trace.draft_lens)
            rejections += sum(1 for d, a in zip(trace.draft_lens, trace.accepted, strict=True) if a < d)
            if trace.rounds > 1:
                draft_s.append(sum(trace.round_draft_s[1:]) / max(sum(trace.draft_lens[1:]), 1))
                verify_s.extend(trace.round_verify_s[1:])
            for bw in BANDWIDTHS_BPS:
                times = retime_speculative(trace, base_bw, bw)
                records.append({"scene": i, "method": "speculative", "draft_len": k, "bandwidth_bps": bw,
                                "tpot_s": tpot_or_nan(times), "ttft_s": times[0], "per_token_s": times[-1] / len(times),
                                "identical": result.token_ids == base.token_ids,
                                "acceptance_rate": trace.acceptance_rate})
            bar.update(1)
    bar.close()
    pair = {"caption_accuracy": correct / len(scenes),
            "alpha": accepted / (accepted + rejections) if accepted + rejections else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "draft_s_per_token": statistics.median(draft_s) if draft_s else float("nan"),
            "verify_s": statistics.median(verify_s) if verify_s else float("nan"),
            "server_only_tpot_s": statistics.median(server_tpot)}
    return records, pair


def uploads(pipeline: Any, images: list[tuple[str, str, bytes]], max_new: int, k: int) -> list[dict[str, Any]]:
    """Each upload mode at each bandwidth, on the device-edge path with draft length ``k``."""
    rows: list[dict[str, Any]] = []
    limits = ImageLimits()
    spec = pipeline.verifier_engine.vision
    drafter = pipeline.drafter_engine
    shared = getattr(drafter, "encoder_digest", None) == getattr(pipeline.verifier_engine, "encoder_digest", 0)
    modes = [m for m in UPLOAD_ROWS if m != "features" or shared]
    bar = tqdm(total=len(images) * len(modes) * len(BANDWIDTHS_BPS), desc="captioning: uploads", unit="run")
    for kind, name, data in images:
        reference: list[int] | None = None
        for mode in modes:
            for bw in BANDWIDTHS_BPS:
                started = time.perf_counter()
                prepared = prepare_image(data, "images[0]", mode, spec, limits, bw,  # type: ignore[arg-type]
                                         drafter.vision_features if shared else None,
                                         drafter.encoder_digest if shared else None)
                device_s = time.perf_counter() - started  # decoding, preprocessing and encoding on the device
                result = pipeline.run(scene_options(data, "device-edge", k, bw, mode, max_new))
                if mode == "raw" and reference is None:
                    reference = result.token_ids
                trace = result.trace
                prefill_s = trace.round_verify_s[0] if trace.round_verify_s else 0.0
                first_draft_s = trace.round_draft_s[0] if trace.round_draft_s else 0.0
                first_up = trace.round_bytes[0] if trace.round_bytes else 0
                # The edge's decoding of what crossed the link is not in the first verify's time: upload_s
                # estimates it from the device's own decoding.
                edge_decode_s = prepared.predicted_s[prepared.mode] - prepared.sent_bytes / bw
                predicted = (device_s + first_draft_s + RTT_S + first_up / bw + edge_decode_s + prefill_s)
                rows.append({
                    "image": name, "kind": kind, "upload": mode, "upload_used": prepared.mode, "bandwidth_bps": bw,
                    "image_bytes_raw": trace.image_bytes_raw, "image_bytes_sent": trace.image_bytes_sent,
                    "device_link_bytes": trace.bytes_up + trace.bytes_down,
                    "bytes_ratio_vs_raw": trace.image_bytes_raw / max(prepared.sent_bytes, 1),
                    "ttft_s": trace.ttft_s + device_s, "predicted_ttft_s": predicted,
                    "tpot_s": trace.tpot_s,
                    "same_output_as_raw": result.token_ids == reference,
                    "token_agreement_with_raw": _agreement(result.token_ids, reference or []),
                })
                bar.update(1)
    bar.close()
    return rows


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (of the longer output) where the two outputs agree."""
    longest = max(len(a), len(b), 1)
    return sum(x == y for x, y in zip(a, b, strict=False)) / longest


def released_tiling_bytes(data: bytes) -> dict[str, Any]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    tiles = image_tiles(image, INTERNVL_RELEASED)
    auto = {f"auto_at_{bw:.0f}": prepare_image(data, "images[0]", "auto", INTERNVL_RELEASED, ImageLimits(), bw).mode
            for bw in BANDWIDTHS_BPS}
    return {"tiles": int(tiles.shape[0]), "visual_tokens": int(tiles.shape[0]) * 256,
            "resized_png_bytes": len(encode_png(stack_tiles(tiles))), "raw_bytes": len(data), **auto}


def paper_prediction(alpha: float) -> list[dict[str, Any]]:
    """Predicted TPOT of InternVL2-2B drafting for InternVL2-26B at each k and bandwidth."""
    rows = []
    draft = GPU_CURVES_MS["InternLM2-1.8B"][1] / 1e3
    for bw in BANDWIDTHS_BPS:
        link = LinkCosts(RTT_S, bw, bw)
        server = GPU_CURVES_MS["InternLM2-20B"][1] / 1e3
        for k in (1, 2, 3, 4, 6, 8, 12, 16, 22, 24, 32):
            verify = interp_ms(GPU_CURVES_MS["InternLM2-20B"], k + 1) / 1e3
            compute = ComputeCosts(draft_s_per_token=draft, verify_base_s=verify, verify_per_token_s=0.0)
            tpot = speculative_tpot_s(k, alpha, compute, link, verify_request_size, VERIFY_RESULT_SIZE)
            rows.append({"bandwidth_bps": bw, "draft_len": k, "predicted_tpot_s": tpot,
                         "server_only_tpot_s": server, "speedup": server / tpot,
                         "expected_tokens": expected_tokens(k, alpha)})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def summarize_fig6(records: list[dict[str, Any]], pair: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["bandwidth_bps"], r["method"], r["draft_len"]) for r in records})
    for bw, method, k in keys:
        group = [r for r in records if (r["bandwidth_bps"], r["method"], r["draft_len"]) == (bw, method, k)]
        server = median([r["tpot_s"] for r in records if r["bandwidth_bps"] == bw and r["method"] == "server-only"])
        server_e2e = median([r["per_token_s"] for r in records
                              if r["bandwidth_bps"] == bw and r["method"] == "server-only"])
        tpot = median([r["tpot_s"] for r in group])
        e2e = median([r["per_token_s"] for r in group])
        predicted = float("nan")
        if method == "speculative":
            compute = ComputeCosts(draft_s_per_token=pair["draft_s_per_token"], verify_base_s=pair["verify_s"],
                                   verify_per_token_s=0.0)
            predicted = speculative_tpot_s(k, pair["alpha"], compute, LinkCosts(RTT_S, bw, bw), verify_request_size,
                                           VERIFY_RESULT_SIZE)
        rows.append({"bandwidth_bps": bw, "method": method, "draft_len": k, "tpot_s": tpot,
                     "predicted_tpot_s": predicted, "ttft_s": statistics.median(r["ttft_s"] for r in group),
                     "tpot_ratio_vs_server_only": tpot / server, "per_token_s": e2e,
                     "per_token_ratio_vs_server_only": e2e / server_e2e,
                     "identical_share": statistics.fmean(1.0 if r["identical"] else 0.0 for r in group),
                     "num_scenes": len(group)})
    return rows


def run(args: argparse.Namespace) -> Path:
    from aiflow_ray.tiers.pipeline import Pipeline
    from aiflow_ray.vision.scenes import make_split

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipeline = Pipeline.load(ModelPairConfig(drafter=args.drafter, verifier=args.verifier, dtype="float32"))
    scenes = make_split("test", args.scenes, seed=args.seed)
    draft_lens = parse_int_ranges(args.draft_lens)
    records, pair = fig6(pipeline, scenes, draft_lens, args.max_new_tokens)
    fig_rows = summarize_fig6(records, pair)
    _write_csv(out_dir / "captioning.csv", fig_rows)
    log.info("fig 6 done: caption accuracy %.3f, alpha %.3f", pair["caption_accuracy"], pair["alpha"])
    images = [("photo", name, camera_photo(name)) for name in PHOTOS[: args.photos]]
    images += [("scene", f"scene-{i}", scene_png(s.image)) for i, s in enumerate(scenes[: args.upload_scenes])]
    upload_rows = uploads(pipeline, images, args.max_new_tokens, args.upload_draft_len)
    _write_csv(out_dir / "captioning_uploads.csv", upload_rows)
    released = [{"image": name, **released_tiling_bytes(data)} for kind, name, data in images if kind == "photo"]
    engine_rows = engine_pairs(scenes[: args.engine_scenes], args.drafter, args.verifier,
                               parse_int_ranges(args.engine_draft_lens), args.max_new_tokens)
    _write_csv(out_dir / "captioning_engines.csv", engine_rows)
    paper = paper_prediction(pair["alpha"])
    _write_csv(out_dir / "captioning_paper_shapes.csv", paper)
    from aiflow_ray.bench.captioning_plot import plot

    plot(out_dir, fig_rows, upload_rows, paper, BANDWIDTHS_BPS, UPLOADS, engine_rows)
    md = write_markdown(out_dir, args, fig_rows, pair, upload_rows, released, paper, engine_rows,
                        time.perf_counter() - started)
    return md


def write_markdown(out_dir: Path, args: argparse.Namespace, fig_rows: list[dict[str, Any]], pair: dict[str, float],
                   upload_rows: list[dict[str, Any]], released: list[dict[str, Any]], paper: list[dict[str, Any]],
                   engine_rows: list[dict[str, Any]], elapsed_s: float) -> Path:
    cmd = (f"python -m aiflow_ray.bench.captioning --scenes {args.scenes} --photos {args.photos} "
           f"--draft-lens {args.draft_lens} --max-new-tokens {args.max_new_tokens} --engine-scenes "
           f"{args.engine_scenes} --engine-draft-lens {args.engine_draft_lens}")
    lines = [
        "# Image captioning across the device-edge link",
        "",
        f"Reproduce: `{cmd}` ({elapsed_s / 60:.1f} min on this machine, {time.strftime('%Y-%m-%d')}). Raw numbers: "
        "captioning.csv (TPOT vs k), captioning_uploads.csv (upload modes), captioning_paper_shapes.csv "
        "(predicted paper shapes), captioning_engines.csv (llama.cpp); plot: captioning.png.",
        "",
        f"Pair: `{args.drafter}` drafts, `{args.verifier}` verifies (InternVL class, trained by the project on "
        "composed Fashion-MNIST scenes, fp32 HF engine). Links: emulated, RTT 20 ms, virtual clock.",
        "",
        "## The trained pair",
        "",
        f"- Verifier caption accuracy on {args.scenes} held-out scenes (exact caption, server-only): "
        f"**{pair['caption_accuracy']:.1%}**",
        f"- Acceptance: per-position alpha {pair['alpha']:.3f}, accepted / drafted {pair['acceptance_rate']:.3f}",
        f"- Compute on this CPU: drafting {pair['draft_s_per_token'] * 1e3:.2f} ms/token, a verify "
        f"{pair['verify_s'] * 1e3:.2f} ms, server-only TPOT {pair['server_only_tpot_s'] * 1e3:.2f} ms",
        "",
        "## TPOT vs draft length (the paper's Fig. 6 on the trained pair)",
        "",
    ]
    table = [["bandwidth", "method", "k", "TPOT ms", "model ms", "TPOT / server-only", "ms / token end to end",
              "e2e / server-only", "identical to server-only", "TTFT ms"]]
    for r in fig_rows:
        tpot = "n/a (one round)" if r["tpot_s"] != r["tpot_s"] else f"{r['tpot_s'] * 1e3:.2f}"
        table.append([format_bandwidth(r["bandwidth_bps"]), r["method"], str(r["draft_len"]), tpot,
                      "" if r["method"] == "server-only" else f"{r['predicted_tpot_s'] * 1e3:.2f}",
                      f"{r['tpot_ratio_vs_server_only']:.2f}", f"{r['per_token_s'] * 1e3:.2f}",
                      f"{r['per_token_ratio_vs_server_only']:.2f}", f"{r['identical_share']:.0%}",
                      f"{r['ttft_s'] * 1e3:.1f}"])
    lines += [md_table(table), ""]
    lines += ["TPOT is the decode time per token after the first (undefined when a draft as long as the caption "
              "emits it in one round); 'end to end' is the last token's time over the token count, TTFT included.",
              "", "## Upload modes", "", f"Device-edge path, k = {args.upload_draft_len}. Photos: scikit-image's, "
              "upscaled to 4032 x 3024 and saved as JPEG (quality 92), as a phone saves a 12-megapixel picture. "
              "TTFT includes decoding, preprocessing and encoding on the device; 'model' is the cost model's TTFT "
              "from the bytes, the link and the measured compute, with the edge's decoding estimated from the "
              "device's (`tiers.images.upload_s`). `auto` picks the lossless representation with the lowest "
              "predicted time to the verifier's input; the one it used is in brackets.", ""]
    table = [["image", "upload", "bandwidth", "bytes raw", "bytes sent", "raw / sent", "TTFT s", "model s",
              "same output as raw"]]
    for r in upload_rows:
        upload = r["upload"] if r["upload"] != "auto" else f"auto ({r['upload_used']})"
        table.append([r["image"], upload, format_bandwidth(r["bandwidth_bps"]), f"{r['image_bytes_raw']:,}",
                      f"{r['image_bytes_sent']:,}", f"{r['bytes_ratio_vs_raw']:.1f}x", f"{r['ttft_s']:.3f}",
                      f"{r['predicted_ttft_s']:.3f}", "yes" if r["same_output_as_raw"] else
                      f"no ({r['token_agreement_with_raw']:.0%} of tokens)"])
    lines += [md_table(table), ""]
    lines += ["InternVL's released preprocessing (448 px tiles, up to 12 plus a thumbnail, 256 visual tokens a tile) "
              "would send, losslessly:", ""]
    table = [["photo", "tiles", "visual tokens", "raw JPEG bytes", "resized PNG bytes",
              *(f"auto at {format_bandwidth(bw)}" for bw in BANDWIDTHS_BPS)]]
    for r in released:
        table.append([r["image"], str(r["tiles"]), f"{r['visual_tokens']:,}", f"{r['raw_bytes']:,}",
                      f"{r['resized_png_bytes']:,}", *(r[f"auto_at_{bw:.0f}"] for bw in BANDWIDTHS_BPS)])
    lines += [md_table(table), ""]
    lines += ["## The paper's shapes, predicted", "",
              "InternVL2-2B (InternLM2-1.8B) drafting for InternVL2-26B (InternLM2-20B): forward times measured on "
              "an H200 (HF eager, bf16; docs/design.md), acceptance as measured on the trained pair; the cost "
              "model of docs/design.md.", ""]
    table = [["bandwidth", "k", "predicted TPOT ms", "server-only ms", "speedup"]]
    for r in paper:
        if r["draft_len"] in (1, 2, 4, 8, 16, 22, 32):
            table.append([format_bandwidth(r["bandwidth_bps"]), str(r["draft_len"]),
                          f"{r['predicted_tpot_s'] * 1e3:.1f}", f"{r['server_only_tpot_s'] * 1e3:.1f}",
                          f"{r['speedup']:.2f}x"])
    lines += [md_table(table), ""]
    lines += engines_markdown(engine_rows)
    path = out_dir / "captioning.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", default="caption-drafter")
    parser.add_argument("--verifier", default="caption-verifier")
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes for TPOT vs k")
    parser.add_argument("--upload-scenes", type=int, default=3, help="held-out scenes for the upload modes")
    parser.add_argument("--photos", type=int, default=4, help="camera photos for the upload modes (up to 4)")
    parser.add_argument("--draft-lens", default="1-6,8,10,12,16,22")
    parser.add_argument("--upload-draft-len", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--engine-scenes", type=int, default=50, help="held-out scenes for the engine pairs")
    parser.add_argument("--engine-draft-lens", default="2,4,8")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="docs/benchmarks")
    print(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
