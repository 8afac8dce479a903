"""Benchmarks: each module writes its results (csv, md, png) to docs/benchmarks/ and names its command."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str] | None = None) -> None:
    """Rows as CSV, columns in the first row's order unless given (then other keys are left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames or rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
