"""Split documents into overlapping chunks on paragraph, then sentence, then word boundaries.

Chunks are at most ``max_chars`` long and consecutive chunks share about ``overlap_chars`` of text,
so a fact that straddles a boundary is whole in at least one chunk. all-MiniLM-L6-v2 reads 256
word pieces (about 1000 characters of English), so the default keeps chunks within what it sees.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def _pieces(text: str, max_chars: int) -> list[str]:
    """Units no longer than max_chars: paragraphs, split further into sentences and words if needed."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= max_chars:
            out.append(para)
            continue
        for sentence in _SENTENCE_END.split(para):
            if len(sentence) <= max_chars:
                out.append(sentence)
                continue
            words, current = sentence.split(), ""
            for word in words:
                while len(word) > max_chars:  # a token with no spaces at all (a URL, a table rule)
                    if current:
                        out.append(current)
                        current = ""
                    out.append(word[:max_chars])
                    word = word[max_chars:]
                candidate = f"{current} {word}".strip()
                if len(candidate) > max_chars:
                    out.append(current)
                    current = word
                else:
                    current = candidate
            if current:
                out.append(current)
    return out


def _tail(text: str, size: int) -> str:
    """The last ``size`` characters of ``text``, starting at a word boundary."""
    if size <= 0:
        return ""
    if len(text) <= size:
        return text
    tail = text[-size:]
    cut = min((i for i in (tail.find(" "), tail.find("\n")) if i >= 0), default=-1)
    return tail[cut + 1 :].strip() if cut >= 0 else ""


def chunk_text(text: str, max_chars: int = 1000, overlap_chars: int = 200) -> list[str]:
    if max_chars < 50:
        raise ValueError("max_chars must be at least 50")
    if not 0 <= overlap_chars < max_chars // 2:
        raise ValueError("overlap_chars must be within [0, max_chars / 2)")
    chunks: list[str] = []
    current = ""
    # Pieces leave room for the overlap, so every chunk after the first can open with one.
    for piece in _pieces(text, max_chars - overlap_chars - 1):
        candidate = f"{current}\n\n{piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
            continue
        chunks.append(current)
        # The next chunk starts with the end of this one, so a fact across the boundary is whole once.
        tail = _tail(current, overlap_chars)
        current = f"{tail} {piece}" if tail else piece
    if current:
        chunks.append(current)
    return chunks
