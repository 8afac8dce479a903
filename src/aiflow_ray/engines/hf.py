"""torch/transformers engine: per-session KV caches, k-step drafting, one-forward block scoring.

Runs on CPU or CUDA. Each session keeps a ``DynamicCache`` plus the token ids whose keys/values it
holds. Committed tokens and cached tokens may diverge (a draft was rejected, the caller rolled back);
before each forward the cache is cropped to their longest common prefix, always leaving at least one
committed token uncached so that the forward yields the next-token logits without storing them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiflow_ray import envs
from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import BeamResult, DraftOutput, ScoreOutput, SessionTable, tokenizer_fingerprint
from aiflow_ray.engines.compute_thread import on_compute_thread, shared_compute
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.speculative.sampling import draft_sparse_probs, sample_sparse, target_probs

log = get_logger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 matmuls are 2-3x faster than fp32 on CPUs with AVX-512 bf16 (measured on the pair).
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def configure_threads() -> None:
    threads = envs.threads()
    if threads:
        torch.set_num_threads(threads)


def load_model(auto_class: Any, path: str | Path, name: str, dtype: str, device: str) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device) of a local directory or hub id, with the engine's threads and dtype rules."""
    from transformers import AutoTokenizer

    configure_threads()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    model: Any = auto_class.from_pretrained(str(path), dtype=torch_dtype)
    model = model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    log.info("loaded %s (%s, %s) in %.1f s", name, torch_dtype, dev, time.perf_counter() - started)
    return model, tokenizer, dev


def encode_with_tokenizer(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    """A string, or a conversation of {role, content} turns (always chat-formatted), with an HF tokenizer."""
    if isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
        # Models without a template get the turns as plain text, one per line.
        prompt = "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt) + "\nassistant:"
        chat = False
    if chat and getattr(tokenizer, "chat_template", None):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    assert isinstance(prompt, str)
    return [int(i) for i in tokenizer.encode(prompt, add_special_tokens=False)]


class TokenizerText:
    """Text in and out through an HF tokenizer (``self.tokenizer``): the HF and vLLM engines share it."""

    tokenizer: Any
    _fingerprint: str | None = None

    def encode_prompt(self, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
        return encode_with_tokenizer(self.tokenizer, prompt, chat)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def vocab_fingerprint(self) -> str:
        """How this tokenizer encodes the probe set (see ``engines.base.tokenizer_fingerprint``)."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.encode_prompt)
        return self._fingerprint


@dataclass
class _Session:
    tokens: list[int]  # committed token ids
    cache: Any = None  # transformers DynamicCache holding KV for `cached`
    cached: list[int] = field(default_factory=list)
    agree: int = 0  # cached[:agree] == tokens[:agree] is known to hold


class HFEngine(TokenizerText, SessionTable):
    """Engine over a transformers causal LM; see ``aiflow_ray.engines.base`` for the contract."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: torch.device) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = next(model.parameters()).dtype
        # A vision-language model's vocabulary is its language model's.
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.eos_token_ids = self._eos_ids()
        self._sessions: dict[str, _Session] = {}
        self._fingerprint: str | None = None
        if device.type == "cpu":  # torch's OpenMP pools: see engines/compute_thread.py
            on_compute_thread(self.model, shared_compute())

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str, dtype: str = "auto", device: str = "auto") -> HFEngine:
        from transformers import AutoModelForCausalLM

        model, tokenizer, dev = load_model(AutoModelForCausalLM, path, name, dtype, device)
        return cls(model, tokenizer, name, dev)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return frozenset(ids)

    # -- sessions (the rest is SessionTable's) ------------------------------------------------
    def _new_session(self, tokens: list[int]) -> _Session:
        return _Session(tokens=tokens)

    def _rolled_back(self, session: _Session, length: int) -> None:
        session.agree = min(session.agree, length)

    # -- compute --------------------------------------------------------------------------------
    def _pending(self, session: _Session) -> list[int]:
        """Crop the cache to the reusable prefix and return the tokens still to be fed."""
        limit = min(len(session.cached), len(session.tokens) - 1)
        agree = min(session.agree, limit)
        while agree < limit and session.cached[agree] == session.tokens[agree]:
            agree += 1
        if agree == 0:
            session.cache = None
            session.cached.clear()
        elif agree < len(session.cached):
            # A negative argument removes that many tokens (a positive one is a deprecated absolute size).
            session.cache.crop(agree - len(session.cached))
            del session.cached[agree:]
        session.agree = agree
        return session.tokens[agree:]

    def _forward(self, session: _Session, new_ids: list[int], keep: int) -> torch.Tensor:
        from transformers import DynamicCache

        if session.cache is None:
            session.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=session.cache, use_cache=True, logits_to_keep=keep)
        session.cache = out.past_key_values
        session.cached.extend(new_ids)
        return out.logits[0, -keep:]  # [keep, V]

    @torch.inference_mode()
    def draft(
        self, session_id: str, k: int, sampling: SamplingConfig, rng: np.random.Generator | None = None
    ) -> DraftOutput:
        session = self._get(session_id)
        started = time.perf_counter()
        feed = self._pending(session)
        committed = len(session.tokens)
        drafted: list[int] = []
        q_ids: list[np.ndarray] = []
        q_probs: list[np.ndarray] = []
        for step in range(k):
            logits = self._forward(session, feed, keep=1)[0]  # [V]
            if sampling.greedy:
                token = int(torch.argmax(logits).item())
            else:
                if rng is None:
                    raise ValueError("sampled drafting needs an rng")
                ids, probs = draft_sparse_probs(logits.float().cpu().numpy(), sampling)
                token = sample_sparse(ids, probs, rng)
                q_ids.append(ids)
                q_probs.append(probs)
            drafted.append(token)
            if step < k - 1:
                feed = [token]
        # Every committed token is cached now; drafted tokens sit beyond them, and `_pending` keeps
        # those that the verifier accepts and crops the rest.
        session.agree = committed
        return DraftOutput(
            token_ids=drafted,
            q_ids=np.stack(q_ids) if q_ids else None,
            q_probs=np.stack(q_probs) if q_probs else None,
            compute_s=time.perf_counter() - started,
        )

    @torch.inference_mode()
    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        session = self._get(session_id)
        started = time.perf_counter()
        feed = self._pending(session)
        committed = len(session.tokens)
        draft = [int(t) for t in draft_ids]
        logits = self._forward(session, feed + draft, keep=len(draft) + 1)  # [k+1, V]
        session.agree = committed
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy() if with_logprobs else None
        if sampling.greedy:
            greedy = [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
            return ScoreOutput(greedy, None, time.perf_counter() - started, logprobs)
        probs = target_probs(logits.float().cpu().numpy(), sampling)
        return ScoreOutput(None, probs, time.perf_counter() - started, logprobs)


def _generate_ids(engine: HFEngine, prompt_ids: Sequence[int], num_beams: int, max_new_tokens: int,
                  length_penalty: float) -> list[int]:
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=engine.device)
    eos = sorted(engine.eos_token_ids) or None
    options: dict[str, Any] = {}
    if num_beams > 1:
        options = {"length_penalty": length_penalty, "early_stopping": True}
    out = engine.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None, return_dict_in_generate=True,
        output_scores=False, **options,
    )
    generated = [int(t) for t in out.sequences[0, ids.shape[1]:].tolist()]
    if eos:
        for i, token in enumerate(generated):
            if token in engine.eos_token_ids:
                return generated[: i + 1]
    return generated


def _sequence_logprob(engine: HFEngine, prompt_ids: Sequence[int], generated: list[int]) -> float:
    if not generated:
        return 0.0
    full = torch.tensor([[*prompt_ids, *generated]], dtype=torch.long, device=engine.device)
    logits = engine.model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(logprobs.gather(1, torch.tensor(generated, device=engine.device)[:, None]).sum().item())


@torch.inference_mode()
def beam_search(
    engine: HFEngine, prompt_ids: Sequence[int], beam_width: int, max_new_tokens: int, length_penalty: float = 1.0
) -> BeamResult:
    """Beam search with transformers' implementation, which reorders one shared KV cache across beams
    instead of recomputing each beam's prefix.

    Beam search prunes: on a flat distribution it can drop the greedy path early and finish below it.
    The greedy answer is decoded too (one more pass, a fraction of a beam's cost) and returned when it
    scores better by the objective beam search optimises, sum log-probability / length^length_penalty,
    so a wider beam is never worse than greedy. Both are scored in one forward each, so the figure is
    comparable across beam widths.
    """
    started = time.perf_counter()
    greedy = _generate_ids(engine, prompt_ids, 1, max_new_tokens, length_penalty)
    best, best_logprob = greedy, _sequence_logprob(engine, prompt_ids, greedy)
    if beam_width > 1:
        beams = _generate_ids(engine, prompt_ids, beam_width, max_new_tokens, length_penalty)
        beam_logprob = _sequence_logprob(engine, prompt_ids, beams)

        def objective(logprob: float, length: int) -> float:
            return logprob / max(length, 1) ** length_penalty

        if objective(beam_logprob, len(beams)) >= objective(best_logprob, len(best)):
            best, best_logprob = beams, beam_logprob
    return BeamResult(best, best_logprob, time.perf_counter() - started)
