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


def test_the_edge_sends_server_only_tokens_within_the_interval_in_one_message() -> None:
    """tiers/edge.py: each token when forwards are slower than the interval; within it, held for the next
    message (never past the stream's next forward), the last token always with its own ``done``."""
    import numpy as np

    from aiflow_ray.network import wire
    from aiflow_ray.tiers.edge import tokens_messages

    sid = wire.new_session_id()

    def run(gaps_s: list[float], interval_s: float, logprobs: bool = False) -> list[tuple[list[int], bool, int]]:
        clock = Clock()

        def decoded():  # type: ignore[no-untyped-def]
            for i, gap_s in enumerate(gaps_s):
                clock.now_s += gap_s
                lp = wire.Logprobs(np.asarray([-0.5 * i], np.float32), np.zeros((1, 2), np.int32),
                                   np.zeros((1, 2), np.float32)) if logprobs else None
                yield 100 + i, i == len(gaps_s) - 1, lp
        out = []
        for message in tokens_messages(decoded(), sid, interval_s, clock):
            msg = wire.decode(message)
            assert isinstance(msg, wire.Tokens)
            out.append((msg.token_ids.tolist(), msg.done, 0 if msg.logprobs is None else len(msg.logprobs.chosen)))
        return out

    assert run([0.06] * 4, 0.05) == [([100], False, 0), ([101], False, 0), ([102], False, 0), ([103], True, 0)]
    assert run([0.02] * 5, 0.05) == [([100], False, 0), ([101, 102, 103], False, 0), ([104], True, 0)]
    assert run([0.001] * 6, 0.05, logprobs=True) == [([100], False, 1), ([101, 102, 103, 104, 105], True, 5)]
    assert run([0.001] * 3, 0.0) == [([100], False, 0), ([101], False, 0), ([102], True, 0)]
