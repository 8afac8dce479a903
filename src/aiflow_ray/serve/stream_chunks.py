"""What goes into a stream's next chunk, and when it may go.

The first round goes out at once (TTFT). Later rounds that come within ``interval_s`` of the last chunk are held
until the interval has passed and go out as one chunk, held no longer than the interval (vLLM's
``stream_interval`` coalesces tokens the same way). Each chunk crosses the device replica, the ingress and the
HTTP proxy; on a 2-core host their CPU is taken from the decode: a streamed on-device request cost 4.5-8 ms a
token more than the same request unstreamed (docs/benchmarks/served_idle.md, run 6). At 30 ms a token, a 50 ms
interval halves the chunks. Rounds slower than the interval (speculative rounds wait on the link) each go out
as they come. A token whose text ends inside a character is held until the character completes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from aiflow_ray.engines.detokenize import IncrementalText
from aiflow_ray.network import wire


class StreamChunks:
    def __init__(self, decode: Callable[[Sequence[int]], str], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._text = IncrementalText(decode)
        self._interval_s = interval_s
        self._clock = clock
        self.tokens: list[int] = []  # not sent yet: held back, or whose text is not complete
        self.logprobs: list[wire.Logprobs] = []
        self._unsent = ""  # the complete text of `tokens`, when `_whole`
        self._whole = False  # every held token's text is complete: the chunk may go out
        self._last_sent_s: float | None = None
        self._held_since_s = 0.0
        self.sent_text = ""
        self.sent_tokens = 0

    def wait_s(self) -> float | None:
        """How long the next round may be waited for before the held chunk must go (None: no limit)."""
        if not self._whole:
            return None
        return max(0.0, self._held_since_s + self._interval_s - self._clock())

    def add(self, tokens: Sequence[int], logprobs: wire.Logprobs | None) -> bool:
        """Hold a round's tokens; True when the chunk should go now."""
        if not self.tokens:  # a new chunk starts: the interval counts from its first token
            self._held_since_s = self._clock()
        self.tokens.extend(tokens)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        delta = self._text.add(list(tokens))
        self._whole = delta is not None
        if delta is None:
            return False
        self._unsent += delta
        return self._last_sent_s is None or self._clock() - self._last_sent_s >= self._interval_s

    def take(self) -> tuple[list[int], str, list[wire.Logprobs]]:
        """The held chunk (tokens, text, logprobs), counted as sent."""
        chunk = (self.tokens, self._unsent, self.logprobs)
        self.sent_text += self._unsent
        self.sent_tokens += len(self.tokens)
        self.tokens, self.logprobs, self._unsent, self._whole = [], [], "", False
        self._last_sent_s = self._clock()
        return chunk
