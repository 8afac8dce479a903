#!/usr/bin/env bash
# The GPU check (`make gpu-check`, docs/benchmarks/gpu.md): exactness on CUDA, forward curves eager vs CUDA
# graphs, predicted TPOT and edge capacity, and the vLLM runs where vLLM is installed. Run on a CUDA machine
# with torch and transformers; results go to $OUT (else docs/benchmarks/gpu-run). Extra arguments go to
# `python3 -m aiflow_ray.bench.gpu_check` (e.g. --budget-s 900, or --device cpu --quick for a smoke run).
# Where nothing can be installed, the wheels of what the machine lacks (pydantic and its parts) travel in
# .whl/ at the repository root and are unpacked into a private folder, never into the system's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-docs/benchmarks/gpu-run}"
mkdir -p "$out"
python="${GPU_CHECK_PYTHON:-python3}"
console="$out/console.log"  # everything printed (gpu.log is the check's own log)
: >"$console"
say() { echo "$*" | tee -a "$console"; }

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$console" || true
elif [[ " $* " != *" --device cpu"* ]]; then
  say "no nvidia-smi: this check needs a CUDA machine (a CPU smoke run: bash scripts/gpu_check.sh --device cpu --quick)"
  exit 2
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
site="${GPU_CHECK_SITE:-/tmp/site}"
shopt -s nullglob
wheels=(.whl/*.whl)
if ! "$python" -c 'import pydantic' 2>/dev/null; then
  if ((${#wheels[@]} == 0)); then
    say "pydantic is missing and no wheels were carried in .whl/: parts 1 and 3 (exactness, TPOT prediction) will fail (docs/benchmarks/gpu.md)"
  else
    say "pydantic is missing: installing ${#wheels[@]} carried wheels into $site: ${wheels[*]}"
    mkdir -p "$site"
    # Without pip a wheel is still a zip archive laid out for site-packages, so unpacking it is enough.
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
      2>&1 | tee -a "$console" || for wheel in "${wheels[@]}"; do "$python" -m zipfile -e "$wheel" "$site"; done
    export PYTHONPATH="$site:$PYTHONPATH"
  fi
fi
# Everything the check reads is local (configs in the repository, the tiny pair built here, fetched weights):
# offline mode keeps transformers from waiting on a network that may not be there.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
# The tiny pair is built under AIFLOW_HOME (default ~/.cache/aiflow, where `aiflow models fetch` put the real
# weights); a read-only home falls back to a scratch folder.
cache_home="${HOME:+$HOME/.cache/aiflow}"
if [[ -z "${AIFLOW_HOME:-}" ]] && ! { [[ -n "$cache_home" ]] && mkdir -p "$cache_home" && [[ -w "$cache_home" ]]; } 2>/dev/null
then
  export AIFLOW_HOME=/tmp/aiflow-home
  say "~/.cache/aiflow is not writable: AIFLOW_HOME=$AIFLOW_HOME"
fi
"$python" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$console"
"$python" -m aiflow_ray.bench.gpu_check --out "$out" "$@" 2>&1 | tee -a "$console"
say "results in $out: gpu.md, gpu.json, gpu.log, gpu.png, console.log"
