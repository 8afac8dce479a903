"""The augmented prompt of a grounded answer: numbered context chunks with their sources, then the question."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SYSTEM = ("Answer the question using the numbered context passages. Cite the passages you use as [1], [2], ... "
          "If the context does not contain the answer, say so.")
MAX_CONTEXT_CHARS = 6000


def grounded_messages(question: str, hits: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], int]:
    """Chat turns for the large model, and how many hits they use (the best first, within
    MAX_CONTEXT_CHARS)."""
    parts: list[str] = []
    used = 0
    for number, hit in enumerate(hits, start=1):
        block = f"[{number}] ({hit['source']})\n{hit['text'].strip()}"
        if parts and used + len(block) > MAX_CONTEXT_CHARS:
            break
        parts.append(block)
        used += len(block)
    context = "\n\n".join(parts) if parts else "(no passages found)"
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]
    return messages, len(parts)
