"""Tiny random Qwen2 models for tests and ``--models tiny``, built locally in seconds.

The drafter is *nested* in the verifier: its single layer, embeddings, final norm and head are the
verifier's own, and the verifier's later layers write small residual updates. The drafter therefore
agrees with the verifier often but not always, which gives realistic acceptance without pretrained
weights. The tokenizer is a byte-level BPE trained on Python's documentation topics (shipped with
CPython), so any text can be encoded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

TINY_VERSION = 2
VOCAB_SIZE = 512
EOS = "<|endoftext|>"
_DRAFTER_LAYERS = 1
_VERIFIER_LAYERS = 4
_LATER_LAYER_SCALE = 0.12
_INIT_RANGE = 0.25


# The same pair with 32-wide attention heads (2 instead of 4): vLLM's CPU attention takes head sizes of 32 and
# up, so vLLM's tests run on this one, in seconds, where the real 1.5B takes minutes a test on this CPU.
VLLM_HEADS = 2


def tiny_dir(home: Path | None = None, heads: int = 4) -> Path:
    suffix = "" if heads == 4 else f"-h{heads}"
    return (home or envs.aiflow_home()) / "models" / f"tiny-v{TINY_VERSION}{suffix}"


def _train_tokenizer(out: Path) -> None:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((topics[name] for name in sorted(topics)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)


def nest(verifier: Any, drafter: Any, layers: Any, prefix: str, shared_layers: int) -> None:
    """Make ``drafter`` the verifier's first ``shared_layers`` decoder layers plus everything else it has (embeddings,
    norm, head, a vision tower), after scaling the verifier's later layers (``layers[shared_layers:]``) down."""
    import torch

    with torch.no_grad():
        for layer in layers[shared_layers:]:
            layer.self_attn.o_proj.weight.mul_(_LATER_LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(_LATER_LAYER_SCALE)
    state = {k: v for k, v in verifier.state_dict().items()
             if not k.startswith(prefix) or int(k[len(prefix):].split(".")[0]) < shared_layers}
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"nesting failed: missing={missing} unexpected={unexpected}")
    drafter.tie_weights()


def build_tiny_pair(home: Path | None = None, force: bool = False, heads: int = 4) -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir), building them deterministically when missing; ``heads`` attention
    heads (two key-value heads with 4, one with 2) over a hidden size of 64."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root = tiny_dir(home, heads)
    verifier_dir, drafter_dir = root / "verifier", root / "drafter"
    if not force and (root / "complete.json").exists():
        return verifier_dir, drafter_dir
    shutil.rmtree(root, ignore_errors=True)
    tok_dir = root / "tokenizer"
    _train_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=8192, tie_word_embeddings=True,
        initializer_range=_INIT_RANGE, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    verifier = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=_VERIFIER_LAYERS, **common)).float().eval()
    drafter = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=_DRAFTER_LAYERS, **common)).float().eval()
    nest(verifier, drafter, verifier.model.layers, "model.layers.", _DRAFTER_LAYERS)
    for model, out in ((verifier, verifier_dir), (drafter, drafter_dir)):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (root / "complete.json").write_text(json.dumps({"version": TINY_VERSION, "vocab_size": vocab}))
    log.info("built tiny nested pair (vocab %d) at %s", vocab, root)
    return verifier_dir, drafter_dir


def tiny_tokenizer_with(special_tokens: tuple[str, ...], home: Path | None = None) -> Any:
    """The tiny pair's tokenizer with a vision family's image tokens added (special, never split)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    text_verifier, _ = build_tiny_pair(home)
    tokenizer = AutoTokenizer.from_pretrained(text_verifier)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True)
    return tokenizer


def save_vision_pair(root: Path, verifier: Any, drafter: Any, tokenizer: Any, processor: dict[str, Any],
                     version: int) -> tuple[Path, Path]:
    """Write a built vision pair (weights, tokenizer, image processor settings) and mark it complete last, so
    an interrupted build is rebuilt rather than half-used. Returns (verifier_dir, drafter_dir)."""
    verifier_dir, drafter_dir = root / "verifier", root / "drafter"
    for model, out in ((verifier, verifier_dir), (drafter, drafter_dir)):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    (root / "complete.json").write_text(json.dumps({"version": version, "vocab_size": len(tokenizer)}))
    return verifier_dir, drafter_dir
