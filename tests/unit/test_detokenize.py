"""Streaming text a window at a time (engines/detokenize.py) gives the whole output's text, on the tokenizers the
project serves: an HF byte-level BPE and llama.cpp's GGUF vocabulary, with characters split across tokens."""

from __future__ import annotations

import random

import pytest

from aiflow_ray.engines.detokenize import IncrementalText
from aiflow_ray.engines.loader import load_engine

TEXT = "naïve café — 数据 ünïcödé 🚀🙂 def f(x):\n    return x ** 2  # ok\n" * 6


@pytest.mark.parametrize(("name", "engine_name"), [
    ("tiny-verifier", "hf"),
    pytest.param("qwen2.5-coder-0.5b-instruct", "llama_cpp", marks=pytest.mark.real_model),
])
def test_deltas_join_to_the_whole_text_whatever_the_chunks(name: str, engine_name: str) -> None:
    engine = load_engine(name, dtype="float32", engine=engine_name, threads=1)  # type: ignore[arg-type]
    ids = engine.encode_prompt(TEXT, chat=False)
    assert engine.decode(ids) == TEXT
    calls: list[int] = []

    def decode(window):  # type: ignore[no-untyped-def]
        calls.append(len(window))
        return engine.decode(window)

    for seed in range(5):
        rng = random.Random(seed)
        text, joined, start = IncrementalText(decode), "", 0
        while start < len(ids):
            step = rng.choice((1, 1, 2, 3, 5))
            delta = text.add(ids[start:start + step])
            start += step
            if delta is not None:
                assert "\ufffd" not in delta
                joined += delta
                assert TEXT.startswith(joined)
        assert joined == TEXT, seed
    # A window, not the whole output, is decoded each time.
    assert max(calls) < len(ids) / 4
