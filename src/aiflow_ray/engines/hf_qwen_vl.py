"""The vision engine for Qwen2-VL and Qwen2.5-VL (transformers' ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``, the classes of the released checkpoints).

What differs from InternVL (``engines.hf_vision``), and how the session engine handles it:

- The image is resized whole (``vision.preprocess.smart_resize``) and each 28 x 28 cell becomes one visual
  token, written ``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>``.
- Positions are 3-D (M-RoPE: time, height, width). Inside an image block they follow the cell grid; after it
  text positions resume at the block's start plus its larger grid side, not at its token count, so a
  token's position is not its index. The model would infer positions from a ``rope_deltas`` it caches on
  itself from the last prompt it saw, which is wrong for any other session sharing the engine; here every
  forward passes its positions, computed with the model's own ``get_rope_index`` over the session's tokens
  (KV cache plus the fed ones) and its images' grids while a forward reaches into or before an image block;
  past the last block, positions are the token's index plus one per-session offset, learnt from that
  computation, so a verify round costs O(draft), not O(context). Text-only sessions: plain 0, 1, 2, ...
- No ``features`` upload: the merger that turns patches into tokens sits inside the vision tower, and the
  project sends such a model's pixels (``resized``: the resized image, losslessly).

Exactness as for InternVL: the features come from the model's ``get_image_features`` and the language model
runs on the same embeddings and positions as ``forward(pixel_values=..., image_grid_thw=...)`` would use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aiflow_ray.engines.base import ImageInput
from aiflow_ray.engines.hf import _Session
from aiflow_ray.engines.hf_vision import HFVisionEngine, _VisionSession
from aiflow_ray.vision.preprocess import qwen_vl_patches
from aiflow_ray.vision.prompting import QWEN_VL_BLOCK_TOKENS


class HFQwenVLEngine(HFVisionEngine):
    """Sessions with images on a Qwen2-VL-class model; see the module docstring."""

    BLOCK_TOKENS = QWEN_VL_BLOCK_TOKENS

    def _init_encoder(self) -> None:
        self.encoder_digest = None  # no features upload (see the module docstring)

    def _forward(self, session: _Session, new_ids: list[int], keep: int) -> torch.Tensor:
        # Always with explicit positions: the model's own inference reads state another session left on it.
        return self._forward_embeds(session, new_ids, keep)

    def _grid(self, image: ImageInput) -> tuple[int, int, int]:
        assert image.tiles is not None and self.vision is not None
        patch = self.vision.patch_size
        return 1, int(image.tiles.shape[1]) // patch, int(image.tiles.shape[2]) // patch

    def _position_ids(self, session: _Session, new_ids: list[int]) -> torch.Tensor:
        start = len(session.cached)
        offset = 0
        if isinstance(session, _VisionSession) and session.images:
            # Past the last image block every position is the token's index plus one offset: rounds of draft
            # verification there (nearly every forward of a caption) take it from the session instead of
            # re-running get_rope_index over the whole context, which grew with every round.
            after_images = start >= session.spans[-1][1] and self.image_token_id not in new_ids
            if not after_images or session.text_position_offset is None:
                return self._rope_positions(session, new_ids)
            offset = session.text_position_offset
        positions = torch.arange(start + offset, start + offset + len(new_ids), device=self.device)
        return positions.view(1, 1, -1).expand(3, 1, -1)

    def _rope_positions(self, session: _VisionSession, new_ids: list[int]) -> torch.Tensor:
        """The model's own get_rope_index over the session's tokens; learns the session's text offset once
        the tokens reach past its last image block."""
        start = len(session.cached)
        ids = torch.tensor([[*session.cached, *new_ids]], dtype=torch.long, device=self.device)
        kinds = (ids == self.image_token_id).to(torch.int32)  # 1: image token, 0: text
        blocks = len([s for s, _ in session.spans if s < ids.shape[1]])
        grids = torch.tensor([self._grid(image) for image in session.images[:blocks]], dtype=torch.long,
                             device=self.device)
        positions, _ = self.model.model.get_rope_index(ids, kinds, image_grid_thw=grids if blocks else None)
        last = ids.shape[1] - 1
        if last >= session.spans[-1][1]:  # the last token is text after every image block
            session.text_position_offset = int(positions[0, 0, last]) - last
        return positions[:, :, start:]

    @torch.inference_mode()
    def _project(self, image: ImageInput) -> torch.Tensor:
        if image.features is not None:
            raise ValueError(f"{self.name} takes images as pixels, not encoder features")
        assert image.tiles is not None and self.vision is not None
        pixels, grid = qwen_vl_patches(image.tiles, self.vision)
        out = self.model.model.get_image_features(
            pixel_values=torch.from_numpy(pixels).to(self.device, self.dtype),
            image_grid_thw=torch.tensor([grid], dtype=torch.long, device=self.device), return_dict=True)
        embeds: torch.Tensor = out.pooler_output[0]
        return embeds  # [tokens, hidden]

    def vision_features(self, tiles: np.ndarray) -> np.ndarray:
        raise ValueError(f"{self.name} takes images as pixels, not encoder features")

    def reference_logits(self, ids: list[int], images: list[ImageInput]) -> Any:
        """The model's own full forward on pixels (no sessions, no cache): what tests compare sessions with."""
        assert self.vision is not None
        patches = [qwen_vl_patches(image.tiles, self.vision) for image in images if image.tiles is not None]
        pixel_values = torch.from_numpy(np.concatenate([p for p, _ in patches])).to(self.device, self.dtype)
        grids = torch.tensor([g for _, g in patches], dtype=torch.long, device=self.device)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids,
                              mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32)).logits[0]
