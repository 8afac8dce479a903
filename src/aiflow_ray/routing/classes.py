"""Request classes: what is known of a request before it runs, for acceptance learned per class.

How many drafted tokens the verifier accepts depends on the request more than on anything the router
measures: on the text pair, code prompts accept markedly more than prose (docs/benchmarks/served.md: auto
was 1.22-1.25x slower than the best forced path on code prompts while it used one acceptance for all), and
captioning an image is a task of its own. The class is cheap to compute at the ingress and coarse on
purpose: each class needs its own requests before its estimate leaves the shared prior.
"""

from __future__ import annotations

import re

# Markers of code, or of a request for code, in the prompt's text; prose rarely carries any.
_CODE = re.compile(
    r"```|\bdef |\bimport |\bclass \w|\breturn\b|#include|=>|[{};]\s*$|\b(python|javascript|typescript|java|rust|"
    r"golang|c\+\+|sql|bash|function|code|script|regex|json|yaml)\b",
    re.IGNORECASE | re.MULTILINE,
)
TEXT_CLASSES = ("text:code", "text:prose")
IMAGE_CLASS_PREFIX = "image:"


def request_class(text: str, images: int = 0) -> str:
    """``text:code``, ``text:prose``, ``image:code`` or ``image:prose``."""
    task = "image" if images else "text"
    return f"{task}:{'code' if _CODE.search(text[:4096]) else 'prose'}"
