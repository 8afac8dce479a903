"""llama.cpp engine (llama-cpp-python's C API): the quantized GGUF as released, at this CPU's speed.

Sessions are llama.cpp *sequences* of one context with a unified KV cache: one model in memory, one
KV pool of ``kv_tokens`` cells (28 KiB a token for the 1.5B at f16, 12 KiB for the 0.5B), shared by
up to ``max_sequences`` live sessions, any of which may use the whole pool. Why sequences rather than
a context per session: contexts each allocate their whole KV cache and compute buffers up front, so
the memory bound would be per session instead of per token; with one pool, a verifier holding many
short sessions costs what their tokens cost. So the sequence count is cheap and set as high as the
edge keeps sessions (``edge_sessions_per_replica``, 64): with 8, sixteen devices on one edge evicted
each other's KV on almost every round and recomputed whole contexts (docs/benchmarks/capacity.md).

A session keeps its committed ids and the ids its sequence holds in the cache; before a forward the
sequence is cut back to their longest common prefix (``llama_memory_seq_rm``), which is how drafts
that were not accepted roll back. When the pool runs out of sequences or cells, the least recently
used other session loses its KV (not its ids) and is recomputed when it comes back.

Prefixes are shared, as llama-server's slots and vLLM's prefix cache share them: a session's first forward
takes the longest common prefix of its ids that any resident sequence holds (a live session's, or one of the
last released sessions', kept while nobody needs their cells) by ``llama_memory_seq_cp``, which in a unified
cache only tags the same cells with one more sequence. Every chat request starts with the template's system
turn (about 20 tokens for Qwen2.5's), and a conversation's next turn repeats all of the last one, so the
prefill feeds only what is new. The KV of a token depends only on the tokens before it, so the copied cells
are the ones a fresh prefill would compute.

The high-level ``Llama`` class knows one sequence only, and its tokenizer helpers truncate long
pieces, so this module calls the C functions directly. Not thread-safe: the tier serialises calls.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiflow_ray.config import MAX_CONTEXT_TOKENS, SamplingConfig
from aiflow_ray.engines.base import DraftOutput, ScoreOutput, SessionTable
from aiflow_ray.engines.compute_thread import shared_compute
from aiflow_ray.engines.llama_cpp_text import GgufText
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.speculative.sampling import draft_sparse_probs, sample_sparse, target_probs

log = get_logger(__name__)

N_BATCH = 512  # tokens per llama_decode call; longer prefills go in chunks
DEFAULT_SEQUENCES = 64  # sessions with KV resident at once (the edge keeps 64 sessions a replica by default)
# Cells in the shared pool (900 MiB for the 1.5B at f16, 390 MiB for the 0.5B): the longest context a request
# may ask for, plus a draft scored past its end, in llama.cpp's 256-cell steps.
DEFAULT_KV_TOKENS = MAX_CONTEXT_TOKENS + 256
# Released sessions whose KV stays as prefix donors (fewer where the pool has few sequences). A few suffice for
# the system turns and the latest conversations; every decode attends over the span of the cells in use, so
# more would slow every live session for prefixes seldom asked again.
RETAINED_SEQUENCES = 4
MIN_SHARED_PREFIX = 4  # tokens; a shorter match saves less than the bookkeeping


class KvCacheFull(RuntimeError):
    """The context has no room for this session's tokens even with every other session evicted."""


@dataclass
class _Session:
    tokens: list[int]  # committed ids
    seq: int | None = None  # llama.cpp sequence holding KV for `cached`, None when evicted
    cached: list[int] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


class LlamaCppEngine(GgufText, SessionTable):
    """Engine over a GGUF file; see ``aiflow_ray.engines.base`` for the contract."""

    def __init__(self, gguf: str | Path, name: str, threads: int | None = None,
                 max_sequences: int = DEFAULT_SEQUENCES, kv_tokens: int = DEFAULT_KV_TOKENS) -> None:
        """``max_sequences`` sessions hold KV at once (at most 256, llama.cpp's limit), sharing ``kv_tokens``
        cells; past either, the least recently used session's KV is dropped and recomputed on its return."""
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # every C log line would otherwise reach stderr
        self._ll = llama_cpp
        self.name = name
        started = time.perf_counter()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.max_sequences = max_sequences
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = kv_tokens
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = max_sequences
        cparams.kv_unified = True  # any mix of sequences in one pass; one pool of cells for all
        cparams.n_outputs_max = 0  # up to n_batch logit rows per decode
        cparams.n_outputs_max_per_seq = 0
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._compute = shared_compute()  # every ggml computation on one thread (one OpenMP pool)
        self.eos_token_ids = frozenset(t for t in range(self.vocab_size)
                                       if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        template = llama_cpp.llama_model_chat_template(self._model, None)
        self._chat: Any = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self._piece(llama_cpp.llama_vocab_eos(self._vocab), special=True).decode("utf-8", "replace")
            self._chat = Jinja2ChatFormatter(template=template.decode(), eos_token=eos, bos_token="",
                                             add_generation_prompt=True)
        self._sessions: dict[str, _Session] = {}
        self._seq_owner: OrderedDict[int, str] = OrderedDict()  # LRU order: oldest first
        self._retained: OrderedDict[int, list[int]] = OrderedDict()  # released sequences' cached ids, oldest first
        self._fingerprint: str | None = None
        log.info("loaded %s (llama.cpp, %d threads, %d sequences sharing %d KV cells) in %.1f s", name,
                 cparams.n_threads, max_sequences, kv_tokens, time.perf_counter() - started)

    def __del__(self) -> None:
        ll = getattr(self, "_ll", None)
        if ll is not None and getattr(self, "_ctx", None):
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None

    # -- sessions (the rest is SessionTable's) ------------------------------------------------
    def _new_session(self, tokens: list[int]) -> _Session:
        return _Session(tokens)

    # A vision engine's image blocks are placeholder ids that differ in content only: never shared.
    share_prefixes = True

    def release(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None or session.seq is None:
            return
        if not (self.share_prefixes and len(session.cached) >= MIN_SHARED_PREFIX):
            self._drop_kv(session)
            return
        seq, cached = session.seq, session.cached
        self._seq_owner.pop(seq, None)
        session.seq, session.cached = None, []
        self._retained[seq] = cached
        while len(self._retained) > min(RETAINED_SEQUENCES, self.max_sequences // 2):
            self._drop_retained()

    # -- KV sequences ---------------------------------------------------------------------------
    def _drop_kv(self, session: _Session) -> None:
        assert session.seq is not None
        self._ll.llama_memory_seq_rm(self._mem, session.seq, -1, -1)
        self._seq_owner.pop(session.seq, None)
        session.seq, session.cached = None, []

    def _drop_retained(self) -> bool:
        """Free the oldest released sequence kept as a prefix donor; False when none is kept."""
        if not self._retained:
            return False
        seq, _ = self._retained.popitem(last=False)
        self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return True

    def _evict_one(self, keep: frozenset[str]) -> bool:
        """Free the oldest retained prefix, else the least recently used live KV of a session not in ``keep``."""
        if self._drop_retained():  # released prefixes go before any live session's KV
            return True
        for seq, owner in self._seq_owner.items():  # oldest first
            if owner not in keep:
                log.info("evicting the KV of session %s (sequence %d)", owner[:8], seq)
                self._drop_kv(self._sessions[owner])
                return True
        return False

    def _sequence_for(self, session_id: str, session: _Session, keep: frozenset[str]) -> int:
        if session.seq is None:
            free = self._free_sequence()
            if free is None:
                self._evict_one(keep)
                free = self._free_sequence()
            assert free is not None
            session.seq = free
        self._seq_owner[session.seq] = session_id
        self._seq_owner.move_to_end(session.seq)
        return session.seq

    def _free_sequence(self) -> int | None:
        return next((s for s in range(self.max_sequences) if s not in self._seq_owner and s not in self._retained),
                    None)

    def _adopt_prefix(self, session: _Session, seq: int, target: list[int], outputs: int) -> None:
        """Start an empty sequence with the longest prefix of ``target`` another sequence holds."""
        head = target[:len(target) - outputs]  # the last `outputs` tokens are fed whatever is held
        donors = [(s, self._sessions[owner].cached) for s, owner in self._seq_owner.items() if s != seq]
        best_seq, best = -1, 0
        for donor, cached in [*donors, *self._retained.items()]:
            common = 0
            for a, b in zip(cached, head, strict=False):
                if a != b:
                    break
                common += 1
            if common > best:
                best_seq, best = donor, common
        if best < MIN_SHARED_PREFIX:
            return
        self._ll.llama_memory_seq_cp(self._mem, best_seq, seq, 0, best)
        session.cached = target[:best]
        if best_seq in self._retained:
            self._retained.move_to_end(best_seq)  # the donor that served last is the last to go

    def _forward(self, session_id: str, extra: list[int], outputs: int) -> np.ndarray:
        """Logits [outputs, V] of the last ``outputs`` tokens of committed + ``extra``, feeding only what
        the session's sequence does not already hold (and at least those ``outputs`` tokens)."""
        session, seq, target, agree = self._prepare(session_id, extra, outputs, frozenset({session_id}))
        self._feed(session_id, session, seq, target, agree, outputs)
        session.cached = target
        return self._logits(outputs)

    def _prepare(self, session_id: str, extra: list[int], outputs: int, keep: frozenset[str]
                 ) -> tuple[_Session, int, list[int], int]:
        """Give the session a sequence holding the longest prefix of committed + ``extra`` it may keep; returns
        the session, its sequence, that target and how many of its tokens the sequence holds."""
        session = self._get(session_id)
        fresh = session.seq is None
        seq = self._sequence_for(session_id, session, keep)
        target = session.tokens + extra
        if fresh and self.share_prefixes:
            self._adopt_prefix(session, seq, target, outputs)
        agree = self._reusable(session, target, outputs)
        if agree < len(session.cached):
            self._ll.llama_memory_seq_rm(self._mem, seq, self._position(session, agree), -1)
            del session.cached[agree:]
        return session, seq, target, agree

    def _logits(self, rows: int) -> np.ndarray:
        """The last decode's ``rows`` logit rows, copied (the buffer is reused by the next decode)."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits(self._ctx), shape=(rows, self.vocab_size)).copy()

    def _reusable(self, session: _Session, target: list[int], outputs: int) -> int:
        """How many leading tokens of ``target`` the sequence's KV already holds and may keep."""
        limit = min(len(session.cached), len(target) - outputs)
        agree = 0
        while agree < limit and session.cached[agree] == target[agree]:
            agree += 1
        return agree

    def _position(self, session: _Session, index: int) -> int:
        """The position of the session's token at ``index`` (its index, for text models)."""
        return index

    def _feed(self, session_id: str, session: _Session, seq: int, target: list[int], agree: int,
              outputs: int) -> None:
        """Decode ``target[agree:]`` into ``seq``, with logits for its last ``outputs`` tokens."""
        self._feed_text(frozenset({session_id}), seq, target[agree:], agree, outputs)

    def _feed_text(self, keep: frozenset[str], seq: int, feed: list[int], pos0: int, outputs: int) -> None:
        start = 0
        while start < len(feed):
            # Every output row must come from the last decode: the last chunk holds the last `outputs`.
            end = len(feed) if len(feed) - start <= N_BATCH else min(start + N_BATCH, len(feed) - outputs)
            self._decode([(seq, feed[start:end], pos0 + start)], outputs if end == len(feed) else 0, keep)
            start = end

    def claim_all_sequences(self) -> list[int]:
        """Every sequence id, emptied (sessions keep their ids and recompute their KV when they come back)."""
        for seq in list(self._seq_owner):
            self._drop_kv(self._sessions[self._seq_owner[seq]])
        while self._drop_retained():
            pass
        return list(range(self.max_sequences))

    def decode_rows(self, feeds: list[tuple[int, list[int], int]], outputs_last: int = 1) -> np.ndarray:
        """Evaluate several sequences at once: ``(seq, tokens, first position)`` each, in as few decodes as
        ``N_BATCH`` allows; returns the logits of each feed's last ``outputs_last`` tokens, in feed order."""
        rows: list[np.ndarray] = []
        pending: list[tuple[int, list[int], int]] = []
        width = 0

        def flush() -> None:
            nonlocal pending, width
            self._decode(pending, outputs_last)
            rows.extend(self._logits(outputs_last * len(pending)))
            pending, width = [], 0

        for seq, tokens, pos0 in feeds:
            while len(tokens) > N_BATCH:  # a long prompt: leading chunks without outputs
                head, tokens, pos0 = tokens[:N_BATCH], tokens[N_BATCH:], pos0 + N_BATCH
                if pending:
                    flush()
                self._decode([(seq, head, pos0 - N_BATCH)], 0)
            if width + len(tokens) > N_BATCH:
                flush()
            pending.append((seq, tokens, pos0))
            width += len(tokens)
        if pending:
            flush()
        return np.stack(rows)

    def _decode(self, feeds: list[tuple[int, list[int], int]], outputs: int | list[int],
                keep: frozenset[str] | None = None) -> None:
        """One ``llama_decode`` of ``(seq, tokens, first position)`` feeds, with logits for the last ``outputs``
        tokens of each feed (one count for all, or one each). Out of KV cells, it evicts the least recently used
        session not in ``keep`` and retries (with no ``keep``, the caller holds every sequence: nothing to evict)."""
        batch = self._batch
        n = 0
        for f, (seq, tokens, pos0) in enumerate(feeds):
            last = outputs if isinstance(outputs, int) else outputs[f]
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos0 + i, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i >= len(tokens) - last
                n += 1
        batch.n_tokens = n
        while True:
            rc = self._compute.run(self._ll.llama_decode, self._ctx, batch)
            if rc == 0:
                return
            if rc == 1 and keep is not None and self._evict_one(keep):  # no free KV cells: make room, retry
                continue
            raise KvCacheFull(f"llama_decode failed ({rc}) for {n} tokens over {len(feeds)} sequences")

    # -- compute --------------------------------------------------------------------------------
    def draft(self, session_id: str, k: int, sampling: SamplingConfig, rng: np.random.Generator | None = None
              ) -> DraftOutput:
        started = time.perf_counter()
        drafted: list[int] = []
        q_ids: list[np.ndarray] = []
        q_probs: list[np.ndarray] = []
        for _ in range(k):
            # The drafted tokens ride in the sequence beyond the committed ones until the verifier rules;
            # the next forward cuts back whatever was not accepted.
            logits = self._forward(session_id, drafted, 1)[0]  # [V]
            if sampling.greedy:
                token = int(np.argmax(logits))
            else:
                if rng is None:
                    raise ValueError("sampled drafting needs an rng")
                ids, probs = draft_sparse_probs(logits, sampling)
                token = sample_sparse(ids, probs, rng)
                q_ids.append(ids)
                q_probs.append(probs)
            drafted.append(token)
        return DraftOutput(drafted, np.stack(q_ids) if q_ids else None, np.stack(q_probs) if q_probs else None,
                           time.perf_counter() - started)

    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        started = time.perf_counter()
        draft = [int(t) for t in draft_ids]
        return scores_of(self._forward(session_id, draft, len(draft) + 1), sampling, with_logprobs, started)


def scores_of(logits: np.ndarray, sampling: SamplingConfig, with_logprobs: bool, started: float,
              shared_forward_tokens: int | None = None) -> ScoreOutput:
    """A score's output from its forward's logits [k+1, V] (``compute_s`` since ``started``)."""
    logprobs = log_softmax(logits) if with_logprobs else None
    if sampling.greedy:
        greedy = [int(t) for t in np.argmax(logits, axis=-1)]
        return ScoreOutput(greedy, None, time.perf_counter() - started, logprobs, shared_forward_tokens)
    return ScoreOutput(None, target_probs(logits, sampling), time.perf_counter() - started, logprobs,
                       shared_forward_tokens)
