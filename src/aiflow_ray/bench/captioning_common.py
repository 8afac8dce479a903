"""What the captioning benchmark's parts share: the prompt and link, a scene as the PNG a client would send, the
options of one run, and the summaries."""

from __future__ import annotations

import io
import statistics

from PIL import Image

from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.tiers.trace import decode_tpot_s

RTT_S = 0.02
PROMPT = "<image>\nDescribe the image."


def scene_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def scene_options(data: bytes, path: str, k: int, bw: float, upload: str, max_new: int) -> GenerateOptions:
    return GenerateOptions(prompt=PROMPT, path=path, draft_len=k, max_new_tokens=max_new,
                           link=LinkConfig(bandwidth_bps=bw, rtt_s=RTT_S, virtual_time=True),
                           images=(ImageSource(data=data, field="images[0]"),), image_upload=upload)


def tpot_or_nan(times: list[float]) -> float:
    """Decode TPOT, undefined (nan) when every token arrived in one round (a draft as long as the caption)."""
    return decode_tpot_s(times) if len(set(times)) > 1 else float("nan")


def median(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
