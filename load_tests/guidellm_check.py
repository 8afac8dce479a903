"""Run the guidellm benchmark tool (0.8.1) against a served API, unchanged, and fail on any errored request.

    make run PROFILE=tiny && .venv/bin/python load_tests/guidellm_check.py --url http://127.0.0.1:8000

guidellm lives in a virtualenv of its own (``.guidellm-venv``, about 1.5 GB: it needs torch, transformers
and datasets), created on first use. It needs a tokenizer for its synthetic prompts, which it would
fetch from a model hub; the served verifier's own tokenizer directory is given instead. Bounded:
a few synchronous requests per request format, streamed and not, 120 s at most each. guidellm exits 0
even when requests failed, so the error count is read from its JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".guidellm-venv"
FORMATS = [("/v1/chat/completions", True), ("/v1/chat/completions", False), ("/v1/completions", True),
           ("/v1/completions", False)]


def ensure_guidellm() -> Path:
    exe = VENV / "bin" / "guidellm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build; an unpinned torch pulls CUDA
        subprocess.run([*pip, "guidellm==0.8.1"], check=True)
    return exe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (default: the tiny verifier's under AIFLOW_HOME)")
    parser.add_argument("--requests", type=int, default=8, help="requests per format")
    parser.add_argument("--profile", default="kind=synchronous",
                        help="guidellm --profile, e.g. kind=concurrent,streams=4")
    args = parser.parse_args()
    from aiflow_ray import envs

    tokenizer = args.tokenizer or envs.aiflow_home() / "models" / "tiny-v2" / "verifier"
    exe = ensure_guidellm()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    key = envs.api_key()
    failed = 0
    with tempfile.TemporaryDirectory() as out:
        for path, stream in FORMATS:
            backend = f"kind=openai_http,target={args.url},request_format={path}"
            backend += ("" if stream else ",stream=false") + (f",api_key={key}" if key else "")
            report = Path(out) / "report.json"
            subprocess.run([str(exe), "run", "--backend", backend, "--profile", args.profile,
                            "--constraint", f"kind=max_requests,count={args.requests}",
                            "--constraint", "kind=max_duration,seconds=120",
                            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                            "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
                            "--output", f"kind=json,path={report}", "--disable-progress"],
                           check=True, env=env, capture_output=True, timeout=300)
            bench = json.loads(report.read_text())["benchmarks"][0]
            totals = bench["metrics"]["request_totals"]
            errors = [r.get("info", {}).get("error") for r in bench["requests"].get("errored", [])]
            print(f"{path} {'stream' if stream else 'no stream'}: {totals['successful']} ok, {totals['errored']} "
                  f"errored{': ' + str(errors[0]) if errors else ''}")
            failed += totals["errored"] + totals["incomplete"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
