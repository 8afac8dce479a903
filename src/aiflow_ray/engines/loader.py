"""Name -> engine: registered names (fetched or built), local directories, or hub ids."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiflow_ray.config import EngineName, ModelPairConfig
from aiflow_ray.engines.base import Engine
from aiflow_ray.models.fetch import fetch_model
from aiflow_ray.models.registry import UnknownModelError, get_entry, known_names
from aiflow_ray.models.tiny import VLLM_HEADS, build_tiny_pair

if TYPE_CHECKING:
    from aiflow_ray.config import VllmArgs


def built_model_dir(key: str) -> Path:
    """A model built on this machine (random tiny pairs, the trained captioning pair), built when missing."""
    if key.startswith("vlm-"):
        from aiflow_ray.models.tiny_vlm import build_tiny_vlm_pair

        pair = build_tiny_vlm_pair()
    elif key.startswith("qwen-vl-"):
        from aiflow_ray.models.tiny_qwen_vl import build_tiny_qwen_vl_pair

        pair = build_tiny_qwen_vl_pair()
    elif key.startswith("caption-"):
        from aiflow_ray.vision.caption_pair import build_caption_pair

        pair = build_caption_pair()
    elif key.startswith("vllm-"):
        pair = build_tiny_pair(heads=VLLM_HEADS)
    else:
        pair = build_tiny_pair()
    return pair[0] if key.endswith("verifier") else pair[1]


def resolve_model_path(name: str, fetch: bool = True) -> Path | str:
    """Where ``transformers`` should load ``name`` from."""
    entry = get_entry(name)
    if entry is not None:
        if entry.tiny is not None:
            return built_model_dir(entry.tiny)
        if not fetch:
            from aiflow_ray.models.fetch import cached_model_dir, is_cached

            if not is_cached(name):
                raise UnknownModelError(f"{name} is registered but not fetched: run `aiflow models fetch {name}`")
            return cached_model_dir(name)
        return fetch_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModelError(f"{path} is a directory without config.json, not a model")
        return path
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name  # a hub id, for deployments that can reach a hub
    raise UnknownModelError(
        f"unknown model {name!r}: use one of {', '.join(known_names())}, a local model directory, or a hub id"
    )


def resolve_gguf(name: str, fetch: bool = True) -> Path:
    """The verified GGUF file of a registered model, or a .gguf path."""
    from aiflow_ray.models.fetch import fetch_gguf, gguf_path

    entry = get_entry(name)
    if entry is not None and entry.gguf is not None:
        return fetch_gguf(entry.gguf) if fetch else gguf_path(entry.gguf)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise UnknownModelError(f"{name!r} has no GGUF file: the llama.cpp engine needs a registered GGUF model "
                            "or a path to a .gguf file")


def load_engine(name: str, dtype: str = "auto", device: str = "auto", fetch: bool = True,
                engine: EngineName = "hf", threads: int | None = None, beams: bool = False,
                vllm: VllmArgs | None = None, shared_decodes: bool = False) -> Engine:
    """``engine`` picks the runtime: ``hf`` (torch/transformers, the reference), ``llama_cpp`` (the GGUF
    as released, quantized; ``dtype`` and ``device`` do not apply) or ``vllm`` (the safetensors weights,
    settings from ``vllm``). ``beams``: size a llama.cpp engine for beam search up to the widest beam the
    API allows (sequences whose prefixes share KV cells). ``shared_decodes``: a llama.cpp text engine that any
    thread may call, running concurrent sessions' forwards in shared decodes (the edge's and the device's,
    engines/llama_cpp_batch.py)."""
    if engine == "vllm":
        from aiflow_ray.config import VllmArgs
        from aiflow_ray.engines.vllm import VllmEngine, cuda_available

        settings = vllm or VllmArgs()
        kv_bytes = settings.kv_cache_bytes
        if kv_bytes is None and not cuda_available():
            kv_bytes = 1 << 30
        # auto resolves in the engine: bf16 where the GPU or CPU computes in it, fp32 elsewhere (vllm_dtype).
        vllm_dtype = settings.dtype if settings.dtype != "auto" else dtype
        return VllmEngine(resolve_model_path(name, fetch), name=name, dtype=vllm_dtype,
                          max_model_len=settings.max_model_len, kv_cache_bytes=kv_bytes,
                          gpu_memory_utilization=settings.gpu_memory_utilization, enforce_eager=settings.enforce_eager,
                          max_num_seqs=settings.max_num_seqs, threads=threads)
    if engine == "llama_cpp":
        from aiflow_ray.engines.beam import MAX_BEAM_WIDTH, beam_sequences
        from aiflow_ray.engines.llama_cpp import LlamaCppEngine

        vision_dir = _vision_checkpoint(name, fetch)
        if vision_dir is not None:
            return _llama_cpp_vision(name, vision_dir, threads)

        if beams:
            return LlamaCppEngine(resolve_gguf(name, fetch), name=name, threads=threads,
                                  max_sequences=beam_sequences(MAX_BEAM_WIDTH))
        if shared_decodes:
            from aiflow_ray.engines.llama_cpp_batch import BatchingLlamaCppEngine

            return BatchingLlamaCppEngine(resolve_gguf(name, fetch), name=name, threads=threads)
        return LlamaCppEngine(resolve_gguf(name, fetch), name=name, threads=threads)
    from aiflow_ray.engines.hf import HFEngine
    from aiflow_ray.engines.hf_vision import HFVisionEngine, is_vision_model
    from aiflow_ray.models.registry import VISION_MODEL_TYPES
    from aiflow_ray.vision.preprocess import QWEN_VL_MODEL_TYPES

    path = resolve_model_path(name, fetch)
    model_type = _model_type(path)
    if model_type in QWEN_VL_MODEL_TYPES:
        from aiflow_ray.engines.hf_qwen_vl import HFQwenVLEngine

        return HFQwenVLEngine.from_pretrained(path, name=name, dtype=dtype, device=device)
    if is_vision_model(path) or model_type in VISION_MODEL_TYPES:
        return HFVisionEngine.from_pretrained(path, name=name, dtype=dtype, device=device)
    return HFEngine.from_pretrained(path, name=name, dtype=dtype, device=device)


def _vision_checkpoint(name: str, fetch: bool) -> Path | None:
    """The local checkpoint directory of ``name`` when it is a vision-language model in transformers' layout
    (llama.cpp serves it through libmtmd, converted from that directory), else None."""
    from aiflow_ray.models.registry import VISION_MODEL_TYPES

    entry = get_entry(name)
    if entry is not None and entry.gguf is not None:
        return None
    if entry is None and not Path(name).expanduser().is_dir():
        return None
    path = resolve_model_path(name, fetch)
    if isinstance(path, Path) and _model_type(path) in VISION_MODEL_TYPES:
        return path
    return None


def _llama_cpp_vision(name: str, model_dir: Path, threads: int | None) -> Engine:
    from transformers import AutoConfig

    from aiflow_ray.engines.llama_cpp_vision import LlamaCppVisionEngine
    from aiflow_ray.models.gguf_convert import convert_vision_checkpoint, pre_tokenizer_of
    from aiflow_ray.vision.preprocess import VisionSpec

    entry = get_entry(name)
    built = entry is not None and entry.tiny is not None
    # The project's own models: fp32 as built (the reference engine's arithmetic) and their tokenizers, trained here
    # with GPT-2's or Qwen2's pre-tokenizer, which the converter knows only by released vocabularies.
    gguf, mmproj = convert_vision_checkpoint(model_dir, outtype="f32" if built else "f16",
                                             pre_tokenizer=pre_tokenizer_of(model_dir) if built else None)
    spec = VisionSpec.from_model_dir(model_dir, AutoConfig.from_pretrained(model_dir))
    return LlamaCppVisionEngine(gguf, mmproj, name=name, vision=spec, threads=threads)


def _model_type(path: str | Path) -> str | None:
    """A local directory's model type from its config.json; a hub id's from its config (fetched)."""
    import json

    config = Path(path) / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("model_type")
    if isinstance(path, str):
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(path).model_type)
    return None


def load_pair(cfg: ModelPairConfig, fetch: bool = True) -> tuple[Engine, Engine]:
    """Load (drafter, verifier); the pipeline refuses a pair whose tokenizers differ."""
    return load_engine(cfg.drafter, cfg.dtype, cfg.device, fetch), load_engine(cfg.verifier, cfg.dtype, cfg.device,
                                                                                fetch)
