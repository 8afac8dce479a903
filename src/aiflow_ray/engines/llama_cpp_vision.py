"""llama.cpp engine for vision-language models: llama.cpp's multimodal library (libmtmd).

Two classes of checkpoints, as transformers holds them: InternVL (``InternVLForConditionalGeneration``, the
paper's family) and Qwen2-VL / Qwen2.5-VL. The language model is a GGUF, the vision tower and projector an
*mmproj* GGUF, both written by llama.cpp's own converter (``models.gguf_convert``). Everything the text engine
does holds (sequences of one shared KV pool, KV reuse, eviction, k-step drafting, one-decode scoring); what this
adds:

- Token ids hold each image as the HF engines' do (``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>`` for InternVL,
  ``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>`` for Qwen2-VL), n from the verifier's
  ``VisionSpec``, so one prompt's ids are the same on an HF device and a llama.cpp edge. A session keeps its
  images' embeddings (libmtmd's encoder runs once a session); a forward that reaches an image block decodes
  those embeddings in its place (``mtmd_helper_decode_image_chunk``), the text around it with ordinary decodes.
  The KV is never cut inside a block.
- The image arrives as the verifier's preprocessing made it (``resized``). InternVL: the tiles the processor
  cut (dynamic tiling, thumbnail last), each encoded by libmtmd as one image of the tower's input size, their
  embeddings one block at consecutive positions, as transformers concatenates them. The mmproj is written for
  one tile an image (``gguf_convert``), so libmtmd never tiles again what the device tiled. Qwen2-VL: one
  28-px-aligned image within the processor's pixel bounds, which libmtmd keeps at its size; positions are
  M-RoPE's: an image's tokens share its first position, text after it resumes at that position plus the
  image's ``n_pos`` (its larger grid side), so a token's position is not its index, and KV cuts
  (``llama_memory_seq_rm``) are made at positions.
- Each block's token count is checked against the spec's. Normalisation and the vision tower run in ggml, so
  outputs match the HF engine up to near-ties, as for text.

Not thread-safe, like the text engine: the tier serialises calls.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiflow_ray.engines.base import ImageInput
from aiflow_ray.engines.llama_cpp import DEFAULT_KV_TOKENS, DEFAULT_SEQUENCES, N_BATCH, KvCacheFull, LlamaCppEngine
from aiflow_ray.engines.llama_cpp import _Session as _TextSession
from aiflow_ray.engines.vision_blocks import ImageBlocks, ImagePromptMismatch, image_spans
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.vision.preprocess import VisionSpec
from aiflow_ray.vision.prompting import IMAGE_CONTEXT, IMAGE_END, IMAGE_START, QWEN_VL_BLOCK_TOKENS

log = get_logger(__name__)


class MultimodalUnavailable(RuntimeError):
    """The installed llama-cpp-python was built without libmtmd."""


@dataclass
class _Image:
    chunks: list[int]  # owned mtmd_input_chunks, one a tile (InternVL) or one in all (Qwen2-VL); freed with it
    n_pos: int  # positions the image takes (M-RoPE: its larger grid side; else its token count)
    embeds: list[np.ndarray] = field(default_factory=list)  # [tokens, n_embd] float32 a chunk, once a session


@dataclass
class _VisionSession(_TextSession):
    images: list[ImageInput] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    encoded: list[_Image] = field(default_factory=list)


def _mtmd() -> Any:
    try:
        from llama_cpp import mtmd_cpp
    except (OSError, FileNotFoundError) as exc:  # the bindings load libmtmd at import
        raise MultimodalUnavailable(
            "llama-cpp-python was built without libmtmd (LLAVA_BUILD=OFF): `make install` builds it with "
            f"images ({exc})") from None
    return mtmd_cpp


class LlamaCppVisionEngine(ImageBlocks, LlamaCppEngine):
    """A GGUF language model with its mmproj GGUF; see the module docstring."""

    BLOCK_TOKENS = QWEN_VL_BLOCK_TOKENS  # InternVL's are set per engine
    encoder_digest: str | None = None  # no features upload: libmtmd's tower and projector run as one
    # An image block's ids are the same placeholders whatever the image: a shared prefix could carry another
    # image's KV.
    share_prefixes = False

    def __init__(self, gguf: str | Path, mmproj: str | Path, name: str, vision: VisionSpec, threads: int | None = None,
                 max_sequences: int = DEFAULT_SEQUENCES, kv_tokens: int = DEFAULT_KV_TOKENS) -> None:
        mt = _mtmd()
        super().__init__(gguf, name, threads=threads, max_sequences=max_sequences, kv_tokens=kv_tokens)
        self._mt = mt
        self.vision = vision
        from llama_cpp._logger import llama_log_callback

        # Through llama-cpp-python's filter, which the text engine set to errors only: libmtmd logs every decode.
        mt.mtmd_log_set(llama_log_callback, None)
        mt.mtmd_helper_log_set(llama_log_callback, None)
        params = mt.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = threads or 1
        if vision.whole_image:
            cell = vision.tile_size * vision.tile_size
            # The processor's own token bounds, so libmtmd keeps an image the device already sized within them.
            params.image_min_tokens = max(1, vision.min_pixels // cell)
            params.image_max_tokens = max(1, vision.max_pixels // cell)
        else:
            self.BLOCK_TOKENS = (IMAGE_START, IMAGE_CONTEXT, IMAGE_END)
        self._mctx = mt.mtmd_init_from_file(str(mmproj).encode(), self._model, params)
        if not self._mctx:
            raise RuntimeError(f"libmtmd could not load {mmproj}")
        self._mrope = bool(mt.mtmd_decode_use_mrope(self._mctx))
        if not mt.mtmd_support_vision(self._mctx) or self._mrope != vision.whole_image:
            raise ValueError(f"{mmproj} is not a {'Qwen2-VL' if vision.whole_image else 'InternVL'}-class "
                             "vision projector")
        ids = [self._tokenize(token) for token in self.BLOCK_TOKENS]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"{name}: the vocabulary lacks the image block tokens {self.BLOCK_TOKENS}")
        self.image_start_id, self.image_token_id, self.image_end_id = (i[0] for i in ids)
        self._n_embd = int(self._ll.llama_model_n_embd_inp(self._model))

    def __del__(self) -> None:
        # At interpreter exit the bindings may be torn down before the engine: nothing is left to free then.
        with contextlib.suppress(Exception):
            for session in list(getattr(self, "_sessions", {}).values()):
                self._free_images(session)
            if getattr(self, "_mctx", None):
                self._mt.mtmd_free(self._mctx)
                self._mctx = None
            super().__del__()

    # -- sessions -------------------------------------------------------------------------------
    def _new_session(self, tokens: list[int]) -> _VisionSession:
        return _VisionSession(tokens)

    def _attach_images(self, session: Any, tokens: list[int], images: Any) -> None:
        super()._attach_images(session, tokens, images)
        try:
            for image, (start, end) in zip(session.images, session.spans, strict=True):
                if image.tiles is None:
                    raise ValueError(f"{self.name} takes images as pixels, not encoder features")
                session.encoded.append(self._image(image.tiles, end - start))
        except Exception:
            self._free_images(session)  # the session is never opened: its earlier images' chunks go with it
            raise

    def release(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._free_images(session)
        super().release(session_id)

    def _free_images(self, session: Any) -> None:
        for image in getattr(session, "encoded", []):
            for chunk in image.chunks:
                self._mt.mtmd_input_chunk_free(chunk)
        session.encoded = []

    def _image(self, tiles: np.ndarray, tokens: int) -> _Image:
        """libmtmd's chunks of one preprocessed image ``[tiles, H, W, 3]``, checked to be ``tokens`` long."""
        if self._mrope:
            chunk, n_pos = self._chunk(tiles[0], tokens)
            return _Image(chunks=[chunk], n_pos=n_pos)
        per_tile = tokens // len(tiles)
        chunks: list[int] = []
        try:
            for tile in tiles:
                chunks.append(self._chunk(tile, per_tile)[0])
        except Exception:
            for chunk in chunks:
                self._mt.mtmd_input_chunk_free(chunk)
            raise
        return _Image(chunks=chunks, n_pos=tokens)

    def _chunk(self, tile: np.ndarray, tokens: int) -> tuple[int, int]:
        """(libmtmd's owned image chunk, its positions) for one image ``[H, W, 3]``, checked ``tokens`` long."""
        mt = self._mt
        pixels = np.ascontiguousarray(tile)
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        bitmap = mt.mtmd_bitmap_init(width, height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mt.mtmd_input_chunks_init()
        try:
            text = mt.mtmd_input_text()
            marker = mt.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self._mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise ImagePromptMismatch(f"libmtmd could not take an image of {width} x {height} px")
            found = [mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks))]
            image = next(c for c in found if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            n_tokens = int(mt.mtmd_input_chunk_get_n_tokens(image))
            if n_tokens != tokens:
                raise ImagePromptMismatch(f"libmtmd makes {n_tokens} tokens of a {width} x {height} px image, "
                                          f"the prompt's block has {tokens}")
            return mt.mtmd_input_chunk_copy(image), int(mt.mtmd_input_chunk_get_n_pos(image))
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _embeds(self, image: _Image) -> list[np.ndarray]:
        if not image.embeds:
            for chunk in image.chunks:
                if self._compute.run(self._mt.mtmd_encode_chunk, self._mctx, chunk) != 0:
                    raise RuntimeError(f"{self.name}: libmtmd could not encode an image")
                n_tokens = int(self._mt.mtmd_input_chunk_get_n_tokens(chunk))
                out = np.ctypeslib.as_array(self._mt.mtmd_get_output_embd(self._mctx),
                                            shape=(n_tokens * self._n_embd,))
                image.embeds.append(out.reshape(n_tokens, self._n_embd).copy())  # the next encode reuses it
        return image.embeds

    # -- compute --------------------------------------------------------------------------------
    def _reusable(self, session: _TextSession, target: list[int], outputs: int) -> int:
        agree = super()._reusable(session, target, outputs)
        for start, end in getattr(session, "spans", []):
            if start < agree < end:  # half an image block cannot stay: decode the block again from its embeddings
                return start
        return agree

    def _position(self, session: _TextSession, index: int) -> int:
        position = index
        for (start, end), image in zip(getattr(session, "spans", []), getattr(session, "encoded", []), strict=True):
            if index >= end:
                position -= (end - start) - image.n_pos
            elif index >= start:
                # M-RoPE: every token of an image block takes the block's first position
                return start + position - index if self._mrope else position
        return position

    def _feed(self, session_id: str, session: _TextSession, seq: int, target: list[int], agree: int,
              outputs: int) -> None:
        if not isinstance(session, _VisionSession) or not session.spans:
            super()._feed(session_id, session, seq, target, agree, outputs)
            return
        index = agree
        while index < len(target):
            block = next(((k, s, e) for k, (s, e) in enumerate(session.spans) if s <= index < e), None)
            if block is not None:
                k, start, end = block
                self._decode_image(session_id, seq, session.encoded[k], self._position(session, start))
                index = end
                continue
            stop = next((s for s, _ in session.spans if s > index), len(target))
            stop = min(stop, len(target))
            self._feed_text(frozenset({session_id}), seq, target[index:stop], self._position(session, index),
                            outputs if stop == len(target) else 0)
            index = stop

    def _decode_image(self, session_id: str, seq: int, image: _Image, position: int) -> None:
        new_position = self._ll.llama_pos(0)
        while True:
            at, rc = position, 0
            for chunk, embeds in zip(image.chunks, self._embeds(image), strict=True):
                rc = self._compute.run(
                    self._mt.mtmd_helper_decode_image_chunk, self._mctx, self._ctx, chunk,
                    embeds.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), at, seq, N_BATCH,
                    ctypes.byref(new_position), self._mt.mtmd_helper_post_decode_callback(0), None)
                if rc != 0:
                    break
                at = int(new_position.value)  # the next tile's embeddings follow this one's
            if rc == 0:
                return
            # Out of KV cells part way: drop what of the block went in, make room, decode it again.
            self._ll.llama_memory_seq_rm(self._mem, seq, position, -1)
            if rc == 1 and self._evict_one(frozenset({session_id})):
                continue
            raise KvCacheFull(f"decoding an image of {image.n_pos} positions failed ({rc})")

    # -- reference --------------------------------------------------------------------------------
    def reference_logits(self, ids: list[int], images: list[ImageInput]) -> np.ndarray:
        """Logits [1, V] of the last token by llama.cpp's own multimodal path, as its CLI runs it: the prompt up
        to the last image block tokenized and evaluated by libmtmd (``mtmd_tokenize``, ``mtmd_helper_eval_chunks``:
        its own image placement and positions), the tokens after it decoded one position after another from the
        position libmtmd returns. No session and no KV reuse: what the conformance suite compares sessions with."""
        mt = self._mt
        spans = image_spans(ids, self.image_token_id)
        if len(spans) != len(images) or not spans:
            raise ImagePromptMismatch("the reference takes one image per image block")
        if not self._mrope:
            return self._reference_by_tiles(ids, images, spans)
        head_end = spans[-1][1] + 1  # through the last <|vision_end|>
        pieces, last = [], 0
        for start, end in spans:
            pieces.append(b"".join(self._piece(t, special=True) for t in ids[last:start - 1]))
            pieces.append(mt.mtmd_default_marker())
            last = end + 1
        text = b"".join(pieces)
        holder = "__reference__"
        self._sessions[holder] = _VisionSession(list(ids))
        seq = self._sequence_for(holder, self._sessions[holder], frozenset({holder}))
        pixels = [np.ascontiguousarray(image.tiles[0]) for image in images if image.tiles is not None]
        bitmaps_list = [mt.mtmd_bitmap_init(int(p.shape[1]), int(p.shape[0]),
                                            p.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))) for p in pixels]
        chunks = mt.mtmd_input_chunks_init()
        try:
            prompt = mt.mtmd_input_text()
            prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = text, len(text), False, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * len(bitmaps_list))(*bitmaps_list)
            if mt.mtmd_tokenize(self._mctx, chunks, ctypes.byref(prompt), bitmaps, len(bitmaps_list)) != 0:
                raise ImagePromptMismatch("libmtmd could not tokenize the reference prompt")
            if int(mt.mtmd_helper_get_n_tokens(chunks)) != head_end:
                raise ImagePromptMismatch("libmtmd's tokens of the prompt differ from the session's ids")
            n_past = self._ll.llama_pos(0)
            tail = [int(t) for t in ids[head_end:]]
            if self._compute.run(mt.mtmd_helper_eval_chunks, self._mctx, self._ctx, chunks, 0, seq, N_BATCH,
                                 not tail, ctypes.byref(n_past)) != 0:
                raise RuntimeError("libmtmd could not evaluate the reference prompt")
            if tail:
                self._feed_text(frozenset({holder}), seq, tail, int(n_past.value), 1)
            row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, -1), shape=(1, self.vocab_size))
            return row.copy()
        finally:
            mt.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps_list:
                mt.mtmd_bitmap_free(bitmap)
            self.release(holder)


    def _reference_by_tiles(self, ids: list[int], images: list[ImageInput], spans: list[tuple[int, int]]) -> np.ndarray:
        """InternVL's reference: the text between blocks decoded whole, each tile of each image tokenized afresh
        and evaluated by libmtmd (``mtmd_helper_eval_chunk_single``: its encoder, then its decode) at consecutive
        positions. The mmproj takes one tile an image, so libmtmd's whole-prompt path cannot hold a tiled image
        as one block; this is that path a tile at a time."""
        holder = "__reference__"
        self._sessions[holder] = _VisionSession(list(ids))
        seq = self._sequence_for(holder, self._sessions[holder], frozenset({holder}))
        try:
            index = 0
            for (start, end), image in zip(spans, images, strict=True):
                assert image.tiles is not None
                if start > index:
                    self._feed_text(frozenset({holder}), seq, [int(t) for t in ids[index:start]], index, 0)
                per_tile = (end - start) // len(image.tiles)
                position = self._ll.llama_pos(start)
                for tile in image.tiles:
                    chunk, _ = self._chunk(tile, per_tile)
                    try:
                        if self._compute.run(self._mt.mtmd_helper_eval_chunk_single, self._mctx, self._ctx, chunk,
                                             position.value, seq, N_BATCH, False, ctypes.byref(position)) != 0:
                            raise RuntimeError("libmtmd could not evaluate a reference tile")
                    finally:
                        self._mt.mtmd_input_chunk_free(chunk)
                index = end
            self._feed_text(frozenset({holder}), seq, [int(t) for t in ids[index:]], index, 1)
            row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, -1), shape=(1, self.vocab_size))
            return row.copy()
        finally:
            self.release(holder)
