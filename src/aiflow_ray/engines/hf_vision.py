"""torch/transformers engine for vision-language models of the InternVL class.

The classes released checkpoints use: ``InternVLForConditionalGeneration`` (InternVL 2.5/3/3.5 "-hf"
checkpoints: InternViT + MLP projector + a Qwen2/Qwen3/Llama language model), loaded from a local directory
or a hub id like the text engine. Everything the text engine does holds (sessions, KV reuse, k-step drafting,
one-forward scoring); what this adds:

- An image block in the token ids is ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``
  (``vision.prompting``). A session keeps its images and their projected embeddings; any forward that feeds an
  image block feeds input embeddings with the image's features in the block's place. The KV cache is never
  cut inside a block: a cut there recomputes the whole block, from the kept embeddings, not the pixels.
- Images arrive as the verifier's preprocessed uint8 tiles (``vision.preprocess``), normalised here, or as
  the vision encoder's output before the projector (``ImageInput.features``), which a device whose model
  shares the encoder computes once and sends instead of pixels.

Exactness: the embeddings are computed with the model's own ``get_image_features`` and the language model
runs on them exactly as ``forward(pixel_values=...)`` would, so speculative and server-only outputs of one
engine agree token for token in fp32, as for text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiflow_ray.engines.base import ImageInput
from aiflow_ray.engines.hf import HFEngine, _Session, load_model
from aiflow_ray.engines.vision_blocks import ImageBlocks
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.models.registry import VISION_MODEL_TYPES
from aiflow_ray.vision.preprocess import QWEN_VL_MODEL_TYPES, VisionSpec, normalize_tiles
from aiflow_ray.vision.prompting import IMAGE_CONTEXT, IMAGE_END, IMAGE_START

log = get_logger(__name__)


@dataclass
class _VisionSession(_Session):
    images: list[ImageInput] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [images] (start, end) of each context block
    embeds: list[torch.Tensor] | None = None  # [images] projected features, [tokens, hidden] each
    # Engines whose positions are not token indices (Qwen2-VL's M-RoPE): a text token past the last image
    # block sits at its index plus this offset, learnt once per session.
    text_position_offset: int | None = None


class HFVisionEngine(ImageBlocks, HFEngine):
    """An ``HFEngine`` whose sessions may hold images; see the module docstring."""

    # The text an image block is written as: start marker, one context token per visual token, end marker.
    BLOCK_TOKENS = (IMAGE_START, IMAGE_CONTEXT, IMAGE_END)
    encoder_digest: str | None  # None: no device may send this model features

    def __init__(self, model: Any, tokenizer: Any, name: str, device: torch.device, vision: VisionSpec) -> None:
        super().__init__(model, tokenizer, name, device)
        self.vision = vision
        config = model.config
        start, context, end = self.BLOCK_TOKENS
        self.image_token_id = int(config.image_token_id)
        self.image_start_id = int(tokenizer.convert_tokens_to_ids(start))
        self.image_end_id = int(tokenizer.convert_tokens_to_ids(end))
        if tokenizer.convert_tokens_to_ids(context) != self.image_token_id:
            raise ValueError(f"{name}: the tokenizer's {context} is not the model's image token")
        self._init_encoder()

    def _init_encoder(self) -> None:
        config = self.model.config
        self._feature_layer = config.vision_feature_layer
        self._feature_strategy = config.vision_feature_select_strategy
        self.encoder_digest = _digest(self.model.model.vision_tower)

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str, dtype: str = "auto", device: str = "auto") -> HFVisionEngine:
        from transformers import AutoModelForImageTextToText

        model, tokenizer, dev = load_model(AutoModelForImageTextToText, path, name, dtype, device)
        spec = (VisionSpec.from_model_dir(path, model.config) if Path(path).is_dir()
                else _hub_spec(str(path), model.config))
        log.info("%s takes images: %s", name, f"{spec.tile_size} px cells of the whole image, up to {spec.max_pixels} "
                 "pixels" if spec.whole_image else f"{spec.tile_size} px tiles, {spec.tokens_per_tile} tokens a tile")
        if model.config.model_type in QWEN_VL_MODEL_TYPES and cls is HFVisionEngine:
            # engines/loader.py picks HFQwenVLEngine for these before loading: M-RoPE needs its positions.
            raise ValueError(f"{name} is a {model.config.model_type} model: load it with HFQwenVLEngine")
        return cls(model, tokenizer, name, dev, spec)

    # -- prompts --------------------------------------------------------------------------------
    def _render(self, prompt: str | list[dict[str, str]], chat: bool) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(prompt, list) and not template:
            return "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt) + "\nassistant:"
        if chat and template:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return str(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        assert isinstance(prompt, str)
        return prompt

    def _tokenize_text(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    # -- sessions -------------------------------------------------------------------------------
    def _new_session(self, tokens: list[int]) -> _VisionSession:
        return _VisionSession(tokens=tokens)

    # -- compute --------------------------------------------------------------------------------
    def _pending(self, session: _Session) -> list[int]:
        feed = super()._pending(session)
        if not isinstance(session, _VisionSession):
            return feed
        cut = len(session.cached)
        for start, end in session.spans:
            if start < cut < end:
                # Half an image block cannot be fed: recompute the block from its kept embeddings.
                if start == 0:
                    session.cache = None
                    session.cached.clear()
                else:
                    session.cache.crop(start - cut)
                    del session.cached[start:]
                session.agree = start
                return session.tokens[start:]
        return feed

    def _forward(self, session: _Session, new_ids: list[int], keep: int) -> torch.Tensor:
        if not isinstance(session, _VisionSession) or not session.spans:
            return super()._forward(session, new_ids, keep)
        return self._forward_embeds(session, new_ids, keep)

    def _position_ids(self, session: _Session, new_ids: list[int]) -> torch.Tensor | None:
        """Positions of ``new_ids`` when the model needs them given (None: the model counts them itself)."""
        return None

    def _forward_embeds(self, session: _Session, new_ids: list[int], keep: int) -> torch.Tensor:
        """Feed ``new_ids`` as input embeddings, with the session's image features in their blocks."""
        from transformers import DynamicCache

        start = len(session.cached)
        ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)  # [1, L, hidden]
        spans = session.spans if isinstance(session, _VisionSession) else []
        covered = [(i, s, e) for i, (s, e) in enumerate(spans) if s < start + len(new_ids) and e > start]
        if covered:
            assert isinstance(session, _VisionSession)
            image_embeds = self._image_embeds(session)
            embeds = embeds.clone()
            for i, s, e in covered:
                if s < start or e > start + len(new_ids):
                    raise RuntimeError("an image block was cut")  # _pending never lets that happen
                embeds[0, s - start : e - start] = image_embeds[i].to(embeds.dtype)
        if session.cache is None:
            session.cache = DynamicCache(config=self.model.config)
        positions = self._position_ids(session, new_ids)
        out = self.model(inputs_embeds=embeds, past_key_values=session.cache, use_cache=True, logits_to_keep=keep,
                         **({} if positions is None else {"position_ids": positions}))
        session.cache = out.past_key_values
        session.cached.extend(new_ids)
        return out.logits[0, -keep:]  # [keep, V]

    def _image_embeds(self, session: _VisionSession) -> list[torch.Tensor]:
        if session.embeds is None:
            session.embeds = [self._project(image) for image in session.images]
        return session.embeds

    def _pixels(self, tiles: np.ndarray) -> torch.Tensor:
        assert self.vision is not None
        return torch.from_numpy(normalize_tiles(tiles, self.vision)).to(self.device, self.dtype)

    @torch.inference_mode()
    def _project(self, image: ImageInput) -> torch.Tensor:
        """[tokens, hidden] input embeddings of one image."""
        inner = self.model.model
        if image.features is not None:
            features = torch.from_numpy(np.asarray(image.features, np.float32)).to(self.device, self.dtype)
            return inner.multi_modal_projector(features)
        assert image.tiles is not None
        out = inner.get_image_features(pixel_values=self._pixels(image.tiles), vision_feature_layer=self._feature_layer,
                                       vision_feature_select_strategy=self._feature_strategy, return_dict=True)
        pooled = out.pooler_output
        return pooled.reshape(-1, pooled.shape[-1])

    @torch.inference_mode()
    def vision_features(self, tiles: np.ndarray) -> np.ndarray:
        """The vision encoder's output before the projector, float32 ``[tokens, D]``: what a device whose
        model shares the verifier's encoder (same ``encoder_digest``) can send instead of pixels."""
        inner = self.model.model
        layer = self._feature_layer
        vision = inner.vision_tower(pixel_values=self._pixels(tiles), return_dict=True,
                                    output_hidden_states=layer != -1)
        feats = vision.last_hidden_state if layer == -1 else vision.hidden_states[layer]
        if self._feature_strategy == "default":
            feats = feats[:, 1:, :]
        side = int(feats.shape[1] ** 0.5)
        feats = feats.reshape(feats.shape[0], side, side, -1)
        feats = inner.pixel_shuffle(feats, scale_factor=self.model.config.downsample_ratio)
        return feats.reshape(-1, feats.shape[-1]).float().cpu().numpy()


    def reference_logits(self, ids: list[int], images: list[ImageInput]) -> Any:
        """The model's own full forward from pixels (no session, no cache, its own image placement): what the
        conformance suite compares sessions with."""
        tiles = [image.tiles for image in images if image.tiles is not None]
        pixels = self._pixels(np.concatenate(tiles)) if tiles else None
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                              pixel_values=pixels).logits[0]


def _digest(module: torch.nn.Module) -> str:
    """Identifies a vision encoder's weights: equal digests mean features computed by one serve the other."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _hub_spec(repo: str, config: Any) -> VisionSpec:
    from huggingface_hub import hf_hub_download

    try:
        local = Path(hf_hub_download(repo, "preprocessor_config.json")).parent
    except Exception:  # a checkpoint without a processor file takes InternVL's defaults
        local = Path("/nonexistent")
    return VisionSpec.from_model_dir(local, config)


def is_vision_model(path: str | Path) -> bool:
    """Whether a model directory holds a vision-language model this engine serves."""
    import json

    config = Path(path) / "config.json"
    if not config.exists():
        return False
    return json.loads(config.read_text()).get("model_type") in VISION_MODEL_TYPES
