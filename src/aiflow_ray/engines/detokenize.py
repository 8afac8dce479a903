"""Text of a growing token list, for streaming: constant work per token, not the whole output again.

Decoding the whole output after each round makes a long stream quadratic. Like vLLM's incremental
detokenizer, this decodes only a short window: the tokens since the last emitted boundary (``prefix``), with
and without the newest ones (``read``); the new text is what the newer decode adds to the older. Decoding
with a little left context keeps tokenizers that render a token differently at a sequence's start (a
SentencePiece leading space) right. A window whose text ends in U+FFFD holds a partial UTF-8 character and
waits for the next tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalText:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # the window's start: text before it is final
        self._read = 0  # tokens whose text has been returned

    def add(self, ids: Sequence[int]) -> str | None:
        """The text ``ids`` add, or None while it ends inside a character (the tokens are kept for later)."""
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if after.endswith("\ufffd"):
            return None
        if len(after) <= len(before):  # tokens without text of their own (an end-of-sequence token)
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]
