"""The Engine protocol on vLLM: sessions on prefix caching, verification batched across sessions.

vLLM serves stateless requests; a session here is its committed ids, and every call is a request whose
prompt is those ids (plus the draft). Automatic prefix caching keeps the KV of every full block of a
session between calls, so a verify computes only the tokens after the session's last full cached block
(at most ``block_size - 1`` committed ones) plus the draft: O(draft) work, as with a session KV cache.
Rollback and release are bookkeeping only: blocks nobody refers to are evicted by vLLM's LRU.

How each result is read out of vLLM (``logprobs_mode="raw_logprobs"``: log-softmax of the logits):
- **Greedy verify of k tokens, one request**: prompt = committed + draft, ``prompt_logprobs=1`` (for
  every prompt position the top-1 token, i.e. the argmax of the target there), ``max_tokens=1`` at
  temperature 0 for the bonus position. Reading cached positions back is allowed
  (``skip_reading_prefix_cache=False``); vLLM then fills prompt logprobs only for positions it
  computed, so the reply's ``num_cached_tokens`` is checked to cover none of the k rows we need, and the
  rare call where it does (another session cached this very draft) is repeated without cache reads.
- **Sampled verify, or logprobs wanted**: the full distribution at each of the k+1 positions: k+1
  requests (prompt = committed + draft[:i], ``max_tokens=1``, ``logprobs=-1``) submitted together, so
  they share one engine step and the session's cached prefix. The target distribution p (temperature,
  top-k, top-p) is formed from those exact log-probabilities by ``target_probs``, as for the other
  engines, and the edge runs the same rejection sampling: accept with min(1, p/q), else sample the
  residual max(0, p - q). The output follows p exactly (tests/unit/test_sampling.py checks it against
  the target distribution with a chi-square test). Prompt logprobs of the whole vocabulary are not
  used: vLLM would allocate them for every prompt position, O(context x vocabulary).
- **Drafting**: greedy in one request of ``max_tokens=k``; sampled one step at a time with the full
  distribution, so the draft distribution q sent to the edge is exactly the one sampled from.
- **Server-only streams** (``stream_greedy``): one native vLLM request, decoded by its continuous batching
  alongside every other stream and verify.

Concurrency: the engine's own event loop runs in a thread; the synchronous protocol methods submit to it
and may be called from many threads at once. Calls of different sessions run as concurrent vLLM requests
and are batched into the same engine steps (``concurrent = True``: the edge takes no lock around it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import BeamResult, DraftOutput, ScoreOutput, SessionTable
from aiflow_ray.engines.hf import TokenizerText, cpu_supports_bf16
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.speculative.sampling import draft_sparse_probs, sample_sparse, target_probs

log = get_logger(__name__)
def vllm_dtype(dtype: str, on_gpu: bool) -> str:
    """``auto``: bf16 on GPUs and on CPUs with bf16 instructions; fp32 elsewhere. vLLM's CPU build runs bf16
    weights on an AVX2-only CPU by converting them: measured on the 1.5B model (2-core AMD EPYC, AVX2), one-token
    decode 2.96 s in bf16 against 0.81 s in fp32, a 4-token verify 5.8 s against 2.7 s."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu or cpu_supports_bf16() else "float32"


T = TypeVar("T")

CALL_TIMEOUT_S = 600.0  # a call stuck this long means the engine process is gone


@dataclass
class _Session:
    tokens: list[int]


def prepare_environment(cache_root: Path | None = None) -> None:
    """Settings vLLM reads from the environment, set before it is imported."""
    from aiflow_ray import envs

    # vLLM's engine processes talk over ZMQ on this address; loopback keeps them off other interfaces.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root or envs.aiflow_home() / "vllm-cache"))
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # forking a Ray worker's threads is unsafe
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class VllmEngine(TokenizerText, SessionTable):
    """See the module docstring. ``kv_cache_bytes`` sizes the KV cache (CPU: the only sensible knob);
    on GPUs ``gpu_memory_utilization`` does instead when ``kv_cache_bytes`` is None."""

    concurrent = True

    def __init__(self, model_dir: str | Path, name: str, *, dtype: str = "auto", max_model_len: int = 4096,
                 kv_cache_bytes: int | None = 1 << 30, gpu_memory_utilization: float = 0.85,
                 enforce_eager: bool | None = None, block_size: int | None = None, max_num_seqs: int = 64,
                 threads: int | None = None) -> None:
        prepare_environment()
        if threads:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.name = name
        on_gpu = cuda_available()
        started = time.perf_counter()
        args = AsyncEngineArgs(
            model=str(model_dir), tokenizer=str(model_dir), dtype=cast(Any, vllm_dtype(dtype, on_gpu)),
            max_model_len=max_model_len, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
            # CPU attention wants blocks in multiples of 32; GPUs keep vLLM's default (16).
            block_size=block_size or (None if on_gpu else 32),
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            kv_cache_memory_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=-1, logprobs_mode="raw_logprobs",
            # Request stats carry the time the scheduler admitted each request into a step: two requests with
            # the same one shared that engine step (what the batching test checks; cheap).
            disable_log_stats=False,
            seed=0,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{name}", daemon=True)
        self._thread.start()
        self._llm: Any = self._run(self._create(args))
        self.block_size = int(self._llm.vllm_config.cache_config.block_size)
        self.vocab_size = int(self._llm.model_config.get_vocab_size())
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_ids = self._eos_ids(model_dir)
        self._sessions: dict[str, _Session] = {}
        self._fingerprint: str | None = None
        self._ids = itertools.count()
        self.recomputes = 0  # greedy verifies repeated without cache reads (see the module docstring)
        self.scheduled: deque[tuple[str, float]] = deque(maxlen=1024)  # (request, engine step it started in)
        log.info("vLLM engine %s up in %.1f s (%s, block %d, vocabulary %d)", name, time.perf_counter() - started,
                 "GPU" if on_gpu else "CPU", self.block_size, self.vocab_size)

    @staticmethod
    async def _create(args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def _eos_ids(self, model_dir: str | Path) -> frozenset[int]:
        ids: set[int] = set()
        gen = self._llm.model_config.try_get_generation_config() or {}
        for source in (gen.get("eos_token_id"), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return frozenset(ids)

    def _run(self, awaitable: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(CALL_TIMEOUT_S)

    def shutdown(self) -> None:
        """Stop the engine's processes and loop. On the loop's own thread: vLLM cancels its output task there,
        which it cannot do safely from another thread (the task would see the engine die and log an error)."""
        if self._llm is None:
            return

        async def stop() -> None:
            self._llm.shutdown()

        try:
            self._run(stop())
        finally:
            self._llm = None  # vLLM's finaliser would shut down again at interpreter exit, without its modules
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (benchmarks that replay the same sequences start cold)."""
        self._run(self._llm.reset_prefix_cache())

    def _new_session(self, tokens: list[int]) -> _Session:
        return _Session(tokens)

    # -- requests -------------------------------------------------------------------------------
    async def _request(self, ids: list[int], **params: Any) -> Any:
        """One vLLM request to completion; its final output."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params.setdefault("max_tokens", 1)
        params.setdefault("temperature", 0.0)
        sampling = SamplingParams(detokenize=False, skip_special_tokens=False, ignore_eos=True, **params)
        request_id = f"{self.name}-{next(self._ids)}"
        final = None
        async for output in self._llm.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id=request_id):
            final = output
        assert final is not None
        if final.metrics is not None:
            self.scheduled.append((request_id, float(final.metrics.scheduled_ts)))
        return final

    def _row(self, position_logprobs: Any) -> np.ndarray:
        """A full-vocabulary {token: Logprob} of one position -> [V] float32 log-probabilities."""
        row = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        items = position_logprobs.items()
        row[np.fromiter((t for t, _ in items), np.int64, len(items))] = np.fromiter(
            (lp.logprob for _, lp in items), np.float32, len(items))
        return row

    async def _full_rows(self, tokens: list[int], draft: list[int]) -> np.ndarray:
        """[k+1, V] log-probabilities of the next token after tokens + draft[:i], i = 0..k, in one step."""
        outputs = await asyncio.gather(*(self._request(tokens + draft[:i], logprobs=-1)
                                         for i in range(len(draft) + 1)))
        return np.stack([self._row(out.outputs[0].logprobs[0]) for out in outputs])

    async def _greedy_rows(self, tokens: list[int], draft: list[int]) -> list[int]:
        """The target's argmax after tokens + draft[:i], i = 0..k, from one request."""
        n = len(tokens)
        if not draft:
            out = await self._request(tokens)
            return [int(out.outputs[0].token_ids[0])]
        out = await self._request(tokens + draft, prompt_logprobs=1, skip_reading_prefix_cache=False)
        if (out.num_cached_tokens or 0) > n - 1:
            # The rows of the draft were read from the cache, so vLLM did not compute their logprobs.
            self.recomputes += 1
            out = await self._request(tokens + draft, prompt_logprobs=1, skip_reading_prefix_cache=True)
        rows = out.prompt_logprobs[n : n + len(draft)]
        best = [max(row.items(), key=lambda kv: (kv[1].logprob, -kv[0]))[0] for row in rows]
        return [*map(int, best), int(out.outputs[0].token_ids[0])]

    # -- the protocol, async (what the edge's event loop awaits) ---------------------------------
    async def ascore(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
                     with_logprobs: bool = False) -> ScoreOutput:
        tokens = list(self._get(session_id).tokens)
        draft = [int(t) for t in draft_ids]
        started = time.perf_counter()
        if sampling.greedy and not with_logprobs:
            return ScoreOutput(await self._greedy_rows(tokens, draft), None, time.perf_counter() - started)
        rows = await self._full_rows(tokens, draft)
        logprobs = rows if with_logprobs else None
        if sampling.greedy:
            greedy = [int(t) for t in np.argmax(rows, axis=-1)]
            return ScoreOutput(greedy, None, time.perf_counter() - started, logprobs)
        return ScoreOutput(None, target_probs(rows, sampling), time.perf_counter() - started, logprobs)

    async def adraft(self, session_id: str, k: int, sampling: SamplingConfig,
                     rng: np.random.Generator | None = None) -> DraftOutput:
        tokens = list(self._get(session_id).tokens)
        started = time.perf_counter()
        if sampling.greedy:
            out = await self._request(tokens, max_tokens=k)
            return DraftOutput([int(t) for t in out.outputs[0].token_ids], None, None, time.perf_counter() - started)
        if rng is None:
            raise ValueError("sampled drafting needs an rng")
        drafted: list[int] = []
        q_ids, q_probs = [], []
        for _ in range(k):
            out = await self._request(tokens + drafted, logprobs=-1)
            ids, probs = draft_sparse_probs(self._row(out.outputs[0].logprobs[0]), sampling)
            drafted.append(sample_sparse(ids, probs, rng))
            q_ids.append(ids)
            q_probs.append(probs)
        return DraftOutput(drafted, np.stack(q_ids), np.stack(q_probs), time.perf_counter() - started)

    async def astream_greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> AsyncGenerator[int, None]:
        """Greedy tokens of one native vLLM request, as they are decoded (server-only streams)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False, ignore_eos=True,
                                  output_kind=RequestOutputKind.DELTA)
        request_id = f"{self.name}-stream-{next(self._ids)}"
        async for output in self._llm.generate(TokensPrompt(prompt_token_ids=[int(t) for t in prompt_ids]),
                                               sampling, request_id=request_id):
            for token in output.outputs[0].token_ids:
                yield int(token)

    # -- the protocol, synchronous ----------------------------------------------------------------
    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        return self._run(self.ascore(session_id, draft_ids, sampling, with_logprobs))

    def draft(self, session_id: str, k: int, sampling: SamplingConfig,
              rng: np.random.Generator | None = None) -> DraftOutput:
        return self._run(self.adraft(session_id, k, sampling, rng))

    def stream_greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """``astream_greedy`` for a thread: tokens as the engine decodes them."""
        stream = self.astream_greedy(prompt_ids, max_new_tokens)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def beam_search(self, prompt_ids: Sequence[int], beam_width: int, max_new_tokens: int,
                    length_penalty: float = 1.0) -> BeamResult:
        from aiflow_ray.engines.beam import vllm_beam_search

        return self._run(vllm_beam_search(self, prompt_ids, beam_width, max_new_tokens, length_penalty))
