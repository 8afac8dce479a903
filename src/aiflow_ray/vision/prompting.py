"""Image placeholders in prompt text, expanded the way InternVL's processor expands them.

A chat turn's image part is rendered as ``IMAGE_PLACEHOLDER`` followed by a newline; before tokenizing,
each placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (visual tokens of that image) + ``</img>``, and the
model replaces the embeddings of the context tokens with the image's visual features. Training, the
device's tokenizer and every engine build image prompts with these functions, so the ids always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
IMAGE_SPECIAL_TOKENS = (IMAGE_START, IMAGE_END, IMAGE_CONTEXT)
QWEN_VL_BLOCK_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


class ImagePromptError(ValueError):
    """The text's placeholders and the images do not match."""


def expand_image_placeholders(text: str, tokens_per_image: Sequence[int], start: str = IMAGE_START,
                              context: str = IMAGE_CONTEXT, end: str = IMAGE_END) -> str:
    """Replace the i-th ``<image>`` of ``text`` by the i-th image's token block (InternVL's markers unless
    others are given: Qwen2-VL writes ``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>``)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ImagePromptError(f"the prompt has {len(pieces) - 1} image placeholders for {len(tokens_per_image)} "
                               "images")
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:], strict=True):
        out.append(f"{start}{context * count}{end}{piece}")
    return "".join(out)


def user_turn_text(parts: Sequence[str | None]) -> str:
    """A user turn's content from its parts in order: a string is text, ``None`` an image."""
    return "".join(f"{IMAGE_PLACEHOLDER}\n" if part is None else part for part in parts)
