"""transformers checkpoints -> GGUF for the llama.cpp engines, with llama.cpp's own converter.

The converter (``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``) ships in the
llama-cpp-python source distribution whose wheel `make install` builds; `make install` unpacks those three into
``AIFLOW_HOME/tools/llama.cpp-convert-<version>``, so the converter always matches the library that loads its
files. A vision-language checkpoint becomes two files: the language model and its *mmproj* (vision tower and
projector), as llama.cpp's users run them.

Adjustments, all outside the converter's files, in the child process that runs it:

- transformers' InternVL layout (``InternVLForConditionalGeneration``, the ``-hf`` releases and the project's
  own models). The converter knows InternVL in its original layout (``InternVLChatModel``, ``llm_config``,
  ``vision_model.*`` / ``mlp1.*`` tensors) and transformers' vision tensor names through Intern-S1
  (``model.vision_tower.*``, ``model.multi_modal_projector.*``). So the config names its sub-models'
  architectures (the language model's from its ``model_type``, the tower ``InternVisionModel``) and the
  tower's tensors get the ``model.`` prefix transformers writes in memory but not on disk. The mmproj is written
  for one tile an image: the device cuts the tiles with the verifier's own processor and the engine encodes
  them one by one, so libmtmd must not tile a tile again.
- The project's own tiny models: their byte-level BPE tokenizer splits text as Qwen2's does (the converter
  knows tokenizers by a hash of known releases' outputs and refuses others, so it is told, only when asked),
  and their vision towers have fewer blocks than the projector's layer index (the converter sizes its
  tensor-name map by the block count, so ``merger.mlp.2`` of a one-block tower would not map; the map is only
  widened).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

_BOOTSTRAP = """
import sys
root, pre = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.path[:0] = [root, root + "/gguf-py"]
import gguf
import conversion.base as base
if pre:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
_name_map = gguf.get_tensor_name_map
gguf.get_tensor_name_map = lambda arch, n_blocks: _name_map(arch, max(n_blocks, 8))

_load_hparams = base.ModelBase.load_hparams
_CAUSAL_LM = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

def _hf_internvl(dir_model, is_mistral_format):
    config = _load_hparams(dir_model, is_mistral_format)
    if config.get("model_type") == "internvl" and "llm_config" not in config:
        config["text_config"]["architectures"] = [_CAUSAL_LM[config["text_config"]["model_type"]]]
        config["vision_config"]["architectures"] = ["InternVisionModel"]
        config["min_dynamic_patch"] = config["max_dynamic_patch"] = 1
    return config

base.ModelBase.load_hparams = staticmethod(_hf_internvl)
import conversion.internvl as internvl
_filter = internvl.InternVisionModel.filter_tensors.__func__

def _hf_names(cls, item):
    name, gen = item
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        name = "model." + name
    return _filter(cls, (name, gen))

internvl.InternVisionModel.filter_tensors = classmethod(_hf_names)
_modify = internvl.InternVisionModel.modify_tensors

def _cls_last(self, data_torch, name, bid):
    if name.endswith("embeddings.position_embeddings.weight"):
        data_torch = data_torch.roll(-1, dims=-2)  # libmtmd's graph puts the class token after the patches
    return _modify(self, data_torch, name, bid)

internvl.InternVisionModel.modify_tensors = _cls_last
import runpy
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class ConverterMissing(RuntimeError):
    """llama.cpp's converter was not unpacked (`make install` does it)."""


def converter_dir(home: Path | None = None) -> Path:
    import llama_cpp

    return (home or envs.aiflow_home()) / "tools" / f"llama.cpp-convert-{llama_cpp.__version__}"


def _key(model_dir: Path, outtype: str, pre_tokenizer: str | None) -> str:
    digest = hashlib.sha256()
    # The bootstrap's adjustments shape the files as much as the converter's version does.
    digest.update(json.dumps([str(model_dir.resolve()), outtype, pre_tokenizer, converter_dir().name,
                              _BOOTSTRAP]).encode())
    for file in sorted(model_dir.iterdir()):
        if file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def pre_tokenizer_of(model_dir: str | Path) -> str | None:
    """llama.cpp's name for how a byte-level BPE tokenizer trained here splits text: ``gpt-2`` (byte-level's own
    pattern) or ``qwen2`` (Qwen2's split, then byte-level); None for anything else (the converter decides)."""
    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        return None
    pre = json.loads(file.read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "qwen2"
    return None


def convert_vision_checkpoint(model_dir: str | Path, outtype: str = "f16", pre_tokenizer: str | None = None,
                              home: Path | None = None) -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of an InternVL- or Qwen2-VL-class checkpoint directory, converted once
    and cached under ``AIFLOW_HOME/gguf/converted``. ``pre_tokenizer`` names the llama.cpp pre-tokenizer for a
    tokenizer the converter does not recognise (the project's tiny ones: ``qwen2``)."""
    model_dir = Path(model_dir)
    tool = converter_dir(home)
    if not (tool / "convert_hf_to_gguf.py").is_file():
        raise ConverterMissing(f"llama.cpp's converter is not at {tool}: run `make install`")
    key = _key(model_dir, outtype, pre_tokenizer)
    out = (home or envs.aiflow_home()) / "gguf" / "converted" / f"{model_dir.name}-{key}"
    text, mmproj = out / f"model-{outtype}.gguf", out / f"mmproj-{outtype}.gguf"
    if text.is_file() and mmproj.is_file():
        return text, mmproj
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    started = time.perf_counter()
    try:
        for target, extra in ((work / text.name, []), (work / mmproj.name, ["--mmproj"])):
            log.info("converting %s to %s with llama.cpp's converter", model_dir, target.name)
            done = subprocess.run(
                [sys.executable, "-c", _BOOTSTRAP, str(tool), pre_tokenizer or "", str(model_dir), *extra,
                 "--outfile", str(target), "--outtype", outtype],
                capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"converting {model_dir} failed:\n{done.stderr[-4000:]}")
        try:
            work.rename(out)  # whole or not at all; a concurrent conversion may have won
        except OSError:
            if not (text.is_file() and mmproj.is_file()):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("converted %s in %.1f s: %s, %s", model_dir.name, time.perf_counter() - started, text.name, mmproj.name)
    return text, mmproj
