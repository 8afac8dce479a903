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
