"""What every vision engine does with image blocks in token ids, whatever runs the model (torch, llama.cpp).

An image stands in the ids as one block: a start marker, one context token per visual token, an end marker
(``vision.prompting``). The device writes the blocks (it knows each image's token count from the verifier's
``VisionSpec``); an engine checks that the blocks and the images agree before a session holds them, so text
that spells image tokens can never pass for an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from aiflow_ray.engines.base import ImageInput
from aiflow_ray.vision.preprocess import TileShapeError, VisionSpec
from aiflow_ray.vision.prompting import expand_image_placeholders


class ImagePromptMismatch(ValueError):
    """The token ids' image blocks and the images given do not match."""


def image_spans(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image-context tokens."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate(tokens):
        if token == image_token_id and start is None:
            start = i
        elif token != image_token_id and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(tokens)))
    return spans


class ImageBlocks:
    """Mixed into a vision engine, which sets ``vision``, ``BLOCK_TOKENS``, the three block token ids, and
    ``_render`` / ``_tokenize_text``; its sessions have ``images`` and ``spans``."""

    BLOCK_TOKENS: tuple[str, str, str]
    vision: VisionSpec | None
    image_token_id: int
    image_start_id: int
    image_end_id: int

    if TYPE_CHECKING:  # the engine class it is mixed into has them
        def _render(self, prompt: str | list[dict[str, str]], chat: bool) -> str: ...

        def _tokenize_text(self, text: str) -> list[int]: ...

    def encode_image_prompt(self, prompt: str | list[dict[str, str]], chat: bool,
                            image_tokens: Sequence[int]) -> list[int]:
        """Like ``encode_prompt``, with the i-th ``<image>`` placeholder standing for ``image_tokens[i]``
        visual tokens. Refuses text that spells image tokens itself (they would pass for an image)."""
        text = expand_image_placeholders(self._render(prompt, chat), image_tokens, *self.BLOCK_TOKENS)
        ids = self._tokenize_text(text)
        self.check_image_blocks(ids, image_tokens)
        return ids

    def check_image_blocks(self, ids: Sequence[int], image_tokens: Sequence[int]) -> None:
        """Each image is exactly one well-formed block of its size, and no image token stands elsewhere."""
        spans = image_spans(ids, self.image_token_id)
        sizes = [end - start for start, end in spans]
        starts = sum(1 for t in ids if t == self.image_start_id)
        ends = sum(1 for t in ids if t == self.image_end_id)
        well_formed = all(start > 0 and ids[start - 1] == self.image_start_id and end < len(ids)
                          and ids[end] == self.image_end_id for start, end in spans)
        if sizes != list(image_tokens) or starts != len(sizes) or ends != len(sizes) or not well_formed:
            raise ImagePromptMismatch(f"the prompt's image blocks ({sizes}) do not match its {len(image_tokens)} "
                                      "images; text may not contain image tokens")

    def _attach_images(self, session: Any, tokens: list[int], images: Sequence[ImageInput]) -> None:
        spans = image_spans(tokens, self.image_token_id)
        sizes = [self.image_tokens(image) for image in images]
        if [end - start for start, end in spans] != sizes:
            raise ImagePromptMismatch(f"image blocks of {[e - s for s, e in spans]} tokens for images of {sizes}")
        session.images = list(images)
        session.spans = spans

    def image_tokens(self, image: ImageInput) -> int:
        if image.features is not None:
            return int(image.features.shape[0])
        assert image.tiles is not None and self.vision is not None
        if image.tiles.dtype != np.uint8:
            raise ImagePromptMismatch(f"image tiles of {image.tiles.dtype}; expected uint8")
        try:
            return self.vision.tokens_for(image.tiles.shape)
        except TileShapeError as exc:
            raise ImagePromptMismatch(str(exc)) from None
