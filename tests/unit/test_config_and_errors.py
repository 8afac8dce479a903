"""Bad input gets a clear error naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.engines.loader import resolve_model_path
from aiflow_ray.models.registry import UnknownModelError
from aiflow_ray.units import parse_bandwidth_bps


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(prompt: str) -> None:
    with pytest.raises(ValidationError, match="prompt"):
        GenerateOptions(prompt=prompt)


@pytest.mark.parametrize("k", [0, -1, 65])
def test_draft_len_out_of_range(k: int) -> None:
    with pytest.raises(ValidationError, match="draft_len"):
        GenerateOptions(prompt="x", draft_len=k)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="bandwith"):
        LinkConfig(bandwith=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        resolve_model_path("no-such-model")


@pytest.mark.parametrize(
    ("text", "bps"), [("500KB/s", 500e3), ("1MB/s", 1e6), ("2 MB/s", 2e6), ("8Mbit/s", 1e6), (250, 250.0)]
)
def test_bandwidth_parsing(text: str, bps: float) -> None:
    assert parse_bandwidth_bps(text) == pytest.approx(bps)


def test_bandwidth_garbage() -> None:
    with pytest.raises(ValueError, match="cannot parse bandwidth"):
        parse_bandwidth_bps("fast")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiflow_ray.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_generate_json_on_tiny_models() -> None:
    def run(path: str) -> dict:
        proc = _cli("generate", "--models", "tiny", "--json", "--path", path, "--draft-len", "3", "--max-new-tokens",
                    "12", "--bandwidth", "2MB/s", "--rtt-ms", "5", "def f(x):")
        assert proc.returncode == 0, proc.stderr
        out: dict = json.loads(proc.stdout)
        return out

    spec, alone = run("device-edge"), run("server-only")
    assert spec["token_ids"] == alone["token_ids"] and len(spec["token_ids"]) == 12  # exact through the CLI too
    trace = spec["trace"]
    assert trace["path"] == "device-edge" and trace["num_tokens"] == 12
    assert sum(trace["accepted"]) + trace["rounds"] >= 12 and trace["ttft_s"] >= 0.005  # one RTT at least
    assert alone["trace"]["rounds"] == 12  # one token a message on the server-only stream


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--models", "tiny", " "), "invalid prompt"),
        (("generate", "--models", "tiny", "--draft-len", "0", "x"), "invalid draft_len"),
        (("generate", "--draft-len", "many", "x"), "draft length must be an integer"),
        (("generate", "--drafter", "no-such-model", "x"), "unknown model 'no-such-model'"),
        (("generate", "--bandwidth", "fast", "x"), "cannot parse bandwidth"),
    ],
)
def test_cli_bad_input(args: tuple[str, ...], message: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
