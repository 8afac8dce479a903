"""transformers checkpoints -> GGUF for the llama.cpp engines, with llama.cpp's own converter.

The converter (``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``) ships in the
llama-cpp-python source distribution whose wheel `make install` builds; `make install` unpacks those three into
``AIFLOW_HOME/tools/llama.cpp-convert-<version>``, so the converter always matches the library that loads its
files. A vision-language checkpoint becomes two files: the language model and its *mmproj* (vision tower and
projector), as llama.cpp's users run them.

Two adjustments for the project's own tiny models, both outside the converter's files, in the child process that
runs it: their byte-level BPE tokenizer splits text as Qwen2's does (the converter knows tokenizers by a hash
of known releases' outputs and refuses others, so it is told), and their vision towers have fewer blocks than
the projector's layer index (the converter sizes its tensor-name map by the block count, so ``merger.mlp.2``
of a one-block tower would not map). Released checkpoints need neither: the first is applied only when asked,
the second only widens a name map.
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
    digest.update(json.dumps([str(model_dir.resolve()), outtype, pre_tokenizer, converter_dir().name]).encode())
    for file in sorted(model_dir.iterdir()):
        if file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def convert_vision_checkpoint(model_dir: str | Path, outtype: str = "f16", pre_tokenizer: str | None = None,
                              home: Path | None = None) -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of a Qwen2-VL-class checkpoint directory, converted once and cached
    under ``AIFLOW_HOME/gguf/converted``. ``pre_tokenizer`` names the llama.cpp pre-tokenizer for a tokenizer
    the converter does not recognise (the project's tiny ones: ``qwen2``)."""
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
