"""Logger set-up shared by the CLI, benchmarks and (later) Serve replicas."""

from __future__ import annotations

import logging

from aiflow_ray import envs

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("aiflow_ray")
        root.addHandler(handler)
        root.setLevel(envs.log_level())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("aiflow_ray") else f"aiflow_ray.{name}")


def clip(text: object, limit: int = 80) -> str:
    """``text`` fit for a log line or an error message: at most ``limit`` characters of it, with
    backslashes and unprintable characters escaped as ``repr`` escapes them, so that client-sent text
    can neither flood the logs nor forge a line of its own; a cut says how long the text was."""
    raw = str(text)
    out: list[str] = []
    used = 0
    for i, char in enumerate(raw):
        piece = char if char.isprintable() and char != "\\" else repr(char)[1:-1]
        if used + len(piece) > limit:
            return "".join(out) + f"... ({len(raw)} chars, {len(raw) - i} cut)"
        out.append(piece)
        used += len(piece)
    return "".join(out)
