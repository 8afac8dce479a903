"""A tiny random Qwen2-VL pair for image tests, built locally in a second.

Same class as the released Qwen2-VL checkpoints (``Qwen2VLForConditionalGeneration``: a ViT with 2-D rotary
positions, a patch merger, a Qwen2 language model with M-RoPE), with small dimensions, nested like the tiny
InternVL pair (``models.tiny_vlm``): the drafter is the verifier's vision tower, embeddings, head and first
language layer. Images are resized whole to multiples of 28 px between 56 x 56 and 224 x 224 pixels' worth, so
an image is 4 to 64 visual tokens, and tests exercise M-RoPE's 3-D positions at a few tokens an image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.models.tiny import nest, save_vision_pair, tiny_tokenizer_with
from aiflow_ray.vision.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from aiflow_ray.vision.prompting import QWEN_VL_BLOCK_TOKENS

log = get_logger(__name__)

TINY_QWEN_VL_VERSION = 1
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
_DRAFTER_LAYERS = 1
_VERIFIER_LAYERS = 4
_INIT_RANGE = 0.25


def tiny_qwen_vl_dir(home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "models" / f"tiny-qwen-vl-v{TINY_QWEN_VL_VERSION}"


def build_tiny_qwen_vl_pair(home: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir), building them deterministically when missing."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    root = tiny_qwen_vl_dir(home)
    if not force and (root / "complete.json").exists():
        return root / "verifier", root / "drafter"
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = tiny_tokenizer_with((*QWEN_VL_BLOCK_TOKENS, "<|video_pad|>"), home)
    start, pad, end, video = (int(tokenizer.convert_tokens_to_ids(t))
                              for t in (*QWEN_VL_BLOCK_TOKENS, "<|video_pad|>"))
    vocab = len(tokenizer)

    def config(layers: int) -> Qwen2VLConfig:
        eos = tokenizer.eos_token_id
        # head_dim 16: M-RoPE's sections (time, height, width) split its 8 frequencies 2 / 3 / 3.
        text = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": layers, "max_position_embeddings": 8192,
                "initializer_range": _INIT_RANGE, "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": eos,
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": _INIT_RANGE}
        return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=pad, video_token_id=video,
                             vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=True)

    torch.manual_seed(8765)
    verifier = Qwen2VLForConditionalGeneration(config(_VERIFIER_LAYERS)).float().eval()
    with torch.no_grad():
        # Random merger outputs the size of token embeddings, so the image steers the output.
        verifier.model.visual.merger.mlp[-1].weight.mul_(4.0)
    drafter = Qwen2VLForConditionalGeneration(config(_DRAFTER_LAYERS)).float().eval()
    nest(verifier, drafter, verifier.model.language_model.layers, "model.language_model.layers.", _DRAFTER_LAYERS)
    processor = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "merge_size": 2,
                 "temporal_patch_size": 2, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
                 "image_processor_type": "Qwen2VLImageProcessor"}
    built = save_vision_pair(root, verifier, drafter, tokenizer, processor, TINY_QWEN_VL_VERSION)
    log.info("built tiny nested Qwen2-VL pair (vocab %d) at %s", vocab, root)
    return built
