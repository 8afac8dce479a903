"""Stream chunks (serve/stream_chunks.py): the first round at once, later rounds coalesced within the interval
and never held longer, split characters held whole, and every token and character sent once."""

from __future__ import annotations

from collections.abc import Sequence

from aiflow_ray.serve.stream_chunks import StreamChunks

# A byte-level toy vocabulary: token i is byte i, so a multi-byte character spans tokens.
TEXT = "ab€cdéfg"


def _decode(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", "replace")


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_rounds_within_the_interval_go_together_and_none_waits_past_it() -> None:
    clock = Clock()
    chunks = StreamChunks(_decode, 0.05, clock)
    assert chunks.wait_s() is None
    assert chunks.add([ord("a")], None), "the first round goes at once"
    assert chunks.take() == ([ord("a")], "a", [])
    clock.now_s += 0.03
    assert not chunks.add([ord("b")], None), "30 ms after the last chunk: held"
    assert chunks.wait_s() is not None and abs(chunks.wait_s() - 0.05) < 1e-9  # type: ignore[operator]
    clock.now_s += 0.03
    assert chunks.add([ord("c")], None), "60 ms after the last chunk: both go"
    assert chunks.take() == ([ord("b"), ord("c")], "bc", [])
    clock.now_s += 0.01
    assert not chunks.add([ord("d")], None)
    clock.now_s += 0.02
    assert abs(chunks.wait_s() - 0.03) < 1e-9  # type: ignore[operator]
    clock.now_s += 0.04
    assert chunks.wait_s() == 0.0, "held as long as the interval: the caller sends it without a new round"
    assert chunks.take()[1] == "d"
    assert chunks.sent_text == "abcd" and chunks.sent_tokens == 4


def test_a_split_character_is_held_until_whole_and_everything_is_sent_once() -> None:
    clock = Clock()
    chunks = StreamChunks(_decode, 0.0, clock)
    data = list(TEXT.encode())
    sent: list[tuple[list[int], str]] = []
    for i, byte in enumerate(data):
        clock.now_s += 0.001 * i
        if chunks.add([byte], None):
            tokens, text, _ = chunks.take()
            sent.append((tokens, text))
        else:
            assert chunks.wait_s() is None, "an incomplete character is never sent by the timer"
    assert "".join(t for _, t in sent) == TEXT and [b for tokens, _ in sent for b in tokens] == data
    assert next(tokens for tokens, text in sent if text == "€") == list("€".encode()), "its three bytes as one chunk"
    assert len(sent) == len(TEXT), "with no interval, a chunk for every whole character"
