"""The package's shape: imports only run down the floors of the house, and no module grows past 400 lines.

Floors, from the ground up, are in FLOORS: a module may import its own floor and the ones below, never
above, and two packages of one floor may not import each other both ways.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "aiflow_ray"
FLOORS: dict[str, int] = {
    # 0: words and settings
    "units": 0, "envs": 0, "logging_utils": 0, "errors": 0, "data": 0, "config": 0,
    # 1: things with no model: the wire, links, estimators; model files; the HTTP client; cross-tier call deadlines
    "network": 1, "models": 1, "client": 1, "calls": 1,
    # images with no model: safe decoding, the verifier's preprocessing, image prompts, the scene data set
    "vision": 1,
    # 2: engines, the speculative maths, retrieval
    "engines": 2, "speculative": 2, "rag": 2,
    # 3: the tiers' logic and the router's, free of Ray Serve
    "tiers": 3, "routing": 3,
    # 4: the HTTP API; 5: Serve deployments and the builder, ray jobs, the local cluster
    "api": 4, "serve": 5, "jobs": 5, "cluster": 5,
    # 6: what a person runs
    "bench": 6, "cli": 6,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.startswith("aiflow_ray.") else ""


def _imports() -> dict[str, set[str]]:
    """Package (first component under aiflow_ray) -> the packages it imports, function-level imports too."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        owner = rel.parts[0]
        if owner == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aiflow_ray."):
                found[owner].add(_part(node.module))
            elif isinstance(node, ast.Import):
                found[owner].update(_part(a.name) for a in node.names if a.name.startswith("aiflow_ray."))
    return found


def test_every_package_has_a_floor() -> None:
    packages = {p.relative_to(SRC).with_suffix("").parts[0] for p in SRC.rglob("*.py")} - {"__init__"}
    assert packages == set(FLOORS)


@pytest.mark.parametrize("owner", sorted(FLOORS))
def test_imports_run_down_the_floors(owner: str) -> None:
    imports = _imports()
    for target in imports.get(owner, set()) - {owner, ""}:
        assert FLOORS[target] <= FLOORS[owner], f"{owner} (floor {FLOORS[owner]}) imports {target} " \
                                                f"(floor {FLOORS[target]})"
        if FLOORS[target] == FLOORS[owner]:
            assert owner not in imports.get(target, set()), f"{owner} and {target} import each other"


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long

