"""A GGUF's own vocabulary and chat template, through llama.cpp's C API (``LlamaCppEngine``'s text side).

llama-cpp-python's high-level helpers truncate long pieces, so these call the C functions directly; they read
the vocabulary only, so any thread may call them while another decodes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from aiflow_ray.engines.base import tokenizer_fingerprint


class GgufText:
    _ll: Any  # the llama_cpp module
    _vocab: Any
    _chat: Any  # the GGUF's Jinja chat formatter, None when it has no template
    _fingerprint: str | None
    eos_token_ids: frozenset[int]

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode()
        cap = len(data) + 16
        while True:
            out = (self._ll.llama_token * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), out, cap, False, True)
            if n >= 0:
                return list(out[:n])
            cap = -n

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _render(self, prompt: str | list[dict[str, str]], chat: bool) -> str:
        if isinstance(prompt, list) and self._chat is None:
            return "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt) + "\nassistant:"
        if chat and self._chat is not None:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return str(self._chat(messages=turns).prompt)
        assert isinstance(prompt, str)
        return prompt

    def _tokenize_text(self, text: str) -> list[int]:
        return self._tokenize(text)

    def encode_prompt(self, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
        """A string, or a conversation of {role, content} turns, with the GGUF's own chat template."""
        return self._tokenize(self._render(prompt, chat))

    def decode(self, token_ids: Sequence[int]) -> str:
        data = b"".join(self._piece(int(t)) for t in token_ids if int(t) not in self.eos_token_ids)
        return data.decode("utf-8", "replace")

    def vocab_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.encode_prompt)
        return self._fingerprint

