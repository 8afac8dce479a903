"""Data files shipped with the package: benchmark prompts and the retrieval evaluation set."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def _jsonl(name: str) -> list[dict[str, Any]]:
    text = resources.files("aiflow_ray.data").joinpath(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_prompts(limit: int | None = None) -> list[dict[str, str]]:
    """The benchmark prompts (code and prose), in a fixed order."""
    prompts = _jsonl("prompts.jsonl")
    return prompts[:limit] if limit else prompts


def load_retrieval_eval() -> list[dict[str, Any]]:
    """Questions about the demo corpora with the sources that answer them."""
    return _jsonl("retrieval_eval.jsonl")
