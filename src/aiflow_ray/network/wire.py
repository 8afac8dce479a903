"""Compact binary messages between the device drafter and the edge verifier (no pickle, ever).

Every message starts with a 24-byte header: magic ``AF``, version, type, a 16-byte session id and a
sequence number. Token ids travel as little-endian int32. A round's uplink carries only the new
draft (4 bytes a token, plus 8 bytes per support entry of the sparse draft distribution when
sampling); the context crosses only when a session starts or the verifier lost it. Decoding checks
every length and bound and raises ``WireError``, so a malformed or hostile payload is rejected
before it touches a model.
"""

from __future__ import annotations

import struct
import uuid

import numpy as np

from aiflow_ray.config import MAX_DRAFT_LEN, SamplingConfig
from aiflow_ray.network.messages import (
    ErrorMsg,
    GenerateRequest,
    Header,
    ImageEncoding,
    ImagePayload,
    Logprobs,
    Message,
    MsgType,
    Ping,
    Pong,
    Release,
    Tokens,
    VerifyRequest,
    VerifyResult,
    VerifyStatus,
    WireError,
)

__all__ = [  # the messages are part of this module's surface: callers use wire.Header, wire.Tokens, ...
    "ErrorMsg", "GenerateRequest", "Header", "ImageEncoding", "ImagePayload",
    "Logprobs", "Message", "MsgType", "Ping", "Pong", "Release", "Tokens",
    "VerifyRequest", "VerifyResult", "VerifyStatus", "WireError",
]

MAGIC = b"AF"
VERSION = 4  # 2: GENERATE carries token ids, not text; 3: images ride with the context; 4: GENERATE continues
MAX_CONTEXT_TOKENS = 131_072
MAX_DRAFT_TOP_K = 256
MAX_PROBE_PADDING_BYTES = 1 << 16
MAX_TOP_LOGPROBS = 20
MAX_IMAGES = 16  # per message
# The ERROR code of a replica asked to continue a session it does not hold (the device sends the prompt).
CONTINUE_NOT_HELD = 409
MAX_IMAGE_PAYLOAD_BYTES = 64 << 20  # per image; the device's own limits are lower and configurable

_HEADER = struct.Struct("<2sBB16sI")
_VERIFY_FIXED = struct.Struct("<BIH")  # flags, base_len, k
_CONTEXT_LEN = struct.Struct("<I")
_SAMPLING = struct.Struct("<ffIQ")  # temperature, top_p, top_k, seed
_SPARSE_K = struct.Struct("<H")
_VERIFY_RESP = struct.Struct("<BHiII")  # status, accepted, next token, verify_us, committed_len
_GEN_FIXED = struct.Struct("<BII")  # flags, max_new_tokens, prompt tokens
_TOKENS_FIXED = struct.Struct("<BH")  # done, count
_ERROR_FIXED = struct.Struct("<H")
_PING_FIXED = struct.Struct("<I")  # padding length
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_LOGPROBS_FIXED = struct.Struct("<BH")  # alternatives per token, tokens
_IMAGE_FIXED = struct.Struct("<BBI")  # encoding, orientation, length

_F_CONTEXT, _F_SAMPLED, _F_SEED, _F_IMAGES, _F_CONTINUE, _F_LOGPROBS, _F_MIN_TOKENS = 1, 2, 4, 8, 16, 32, 64
_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


def new_session_id() -> bytes:
    return uuid.uuid4().bytes


_SESSION_AT = _HEADER.size - 16 - 4  # the header ends with the 16-byte session id and the 4-byte sequence number


def peek_session_id(payload: bytes) -> bytes | None:
    """The session id of a message without decoding it (routing, error replies); None when too short to have one."""
    if len(payload) < _HEADER.size:
        return None
    return bytes(payload[_SESSION_AT:_SESSION_AT + 16])


def _header(kind: MsgType, session_id: bytes, seq: int) -> bytes:
    if len(session_id) != 16:
        raise WireError("session id must be 16 bytes")
    return _HEADER.pack(MAGIC, VERSION, int(kind), session_id, seq)


def _sampling_bytes(sampling: SamplingConfig) -> bytes:
    return _SAMPLING.pack(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed or 0)


def normalize_q(q_probs32: np.ndarray) -> np.ndarray:
    """float32 wire probabilities -> the float64 distribution both ends use, bit for bit."""
    q = q_probs32.astype(np.float64)
    return q / q.sum(axis=-1, keepdims=True)


def encode_verify(req: VerifyRequest) -> bytes:
    k = len(req.draft_ids)
    flags = 0
    parts: list[bytes] = []
    if req.context is not None:
        flags |= _F_CONTEXT
        parts.append(_CONTEXT_LEN.pack(len(req.context)))
        parts.append(np.asarray(req.context, dtype=_I32).tobytes())
        if req.sampling is not None and not req.sampling.greedy:
            flags |= _F_SAMPLED | (_F_SEED if req.sampling.seed is not None else 0)
            parts.append(_sampling_bytes(req.sampling))
        if req.logprobs is not None:
            flags |= _F_LOGPROBS
            parts.append(_U8.pack(req.logprobs))
        if req.images:
            flags |= _F_IMAGES
            parts.append(_images_bytes(req.images))
    parts.append(np.asarray(req.draft_ids, dtype=_I32).tobytes())
    if req.q_ids is not None and req.q_probs is not None:
        parts.append(_SPARSE_K.pack(req.q_ids.shape[1] if k else 0))
        parts.append(np.asarray(req.q_ids, dtype=_I32).tobytes())
        parts.append(np.asarray(req.q_probs, dtype=_F32).tobytes())
    head = _header(MsgType.VERIFY, req.header.session_id, req.header.seq)
    return head + _VERIFY_FIXED.pack(flags, req.base_len, k) + b"".join(parts)


def encode_verify_result(res: VerifyResult) -> bytes:
    head = _header(MsgType.VERIFY_RESULT, res.header.session_id, res.header.seq)
    return head + _VERIFY_RESP.pack(
        int(res.status), res.num_accepted, res.next_token, min(res.verify_us, 2**32 - 1), res.committed_len
    ) + _logprobs_bytes(res.logprobs)


def _images_bytes(images: tuple[ImagePayload, ...]) -> bytes:
    if len(images) > MAX_IMAGES:
        raise WireError(f"{len(images)} images exceed the limit of {MAX_IMAGES} per message")
    parts = [_U8.pack(len(images))]
    for image in images:
        if len(image.data) > MAX_IMAGE_PAYLOAD_BYTES:
            raise WireError(f"an image of {len(image.data)} bytes exceeds {MAX_IMAGE_PAYLOAD_BYTES}")
        parts.append(_IMAGE_FIXED.pack(int(image.encoding), image.orientation, len(image.data)))
        parts.append(image.data)
    return b"".join(parts)


def _read_images(reader: _Reader) -> tuple[ImagePayload, ...]:
    (count,) = reader.unpack(_U8, "image count")
    if not 1 <= count <= MAX_IMAGES:
        raise WireError(f"{count} images is outside 1..{MAX_IMAGES}")
    images = []
    for _ in range(count):
        encoding, orientation, size = reader.unpack(_IMAGE_FIXED, "image header")
        try:
            kind = ImageEncoding(encoding)
        except ValueError:
            raise WireError(f"unknown image encoding {encoding}") from None
        if not 1 <= orientation <= 8:
            raise WireError(f"image orientation {orientation} is outside 1..8")
        if size > MAX_IMAGE_PAYLOAD_BYTES:
            raise WireError(f"an image of {size} bytes exceeds {MAX_IMAGE_PAYLOAD_BYTES}")
        images.append(ImagePayload(kind, bytes(reader.take(size, "image")), orientation))
    return tuple(images)


def _logprobs_bytes(lp: Logprobs | None) -> bytes:
    if lp is None:
        return b""
    m, n = lp.top_ids.shape
    return (_LOGPROBS_FIXED.pack(n, m) + np.asarray(lp.chosen, _F32).tobytes()
            + np.asarray(lp.top_ids, _I32).tobytes() + np.asarray(lp.top_logprobs, _F32).tobytes())


def encode_generate(req: GenerateRequest) -> bytes:
    ids = np.asarray(req.prompt_ids, dtype=_I32)
    flags = 0
    tail = b""
    if req.continue_from:  # the session's committed length in place of the prompt's, and no ids
        if len(ids) or req.images:
            raise WireError("a continuing GENERATE carries no prompt and no images")
        flags = _F_CONTINUE | (_F_MIN_TOKENS if req.min_tokens else 0)
        tail = _U32.pack(req.min_tokens) if req.min_tokens else b""
        head = _header(MsgType.GENERATE, req.header.session_id, req.header.seq)
        return head + _GEN_FIXED.pack(flags, req.max_new_tokens, req.continue_from) + tail
    if req.sampling is not None and not req.sampling.greedy:
        flags |= _F_SAMPLED | (_F_SEED if req.sampling.seed is not None else 0)
        tail = _sampling_bytes(req.sampling)
    if req.min_tokens:
        flags |= _F_MIN_TOKENS
        tail += _U32.pack(req.min_tokens)
    if req.logprobs is not None:
        flags |= _F_LOGPROBS
        tail += _U8.pack(req.logprobs)
    if req.images:
        flags |= _F_IMAGES
        tail += _images_bytes(req.images)
    head = _header(MsgType.GENERATE, req.header.session_id, req.header.seq)
    return head + _GEN_FIXED.pack(flags, req.max_new_tokens, len(ids)) + ids.tobytes() + tail


def encode_tokens(msg: Tokens) -> bytes:
    head = _header(MsgType.TOKENS, msg.header.session_id, msg.header.seq)
    ids = np.asarray(msg.token_ids, dtype=_I32)
    return head + _TOKENS_FIXED.pack(int(msg.done), len(ids)) + ids.tobytes() + _logprobs_bytes(msg.logprobs)


def encode_release(msg: Release) -> bytes:
    return _header(MsgType.RELEASE, msg.header.session_id, msg.header.seq)


def encode_ping(msg: Ping) -> bytes:
    if not 0 <= msg.padding_bytes <= MAX_PROBE_PADDING_BYTES:
        raise WireError(f"probe padding must be within 0..{MAX_PROBE_PADDING_BYTES} bytes")
    head = _header(MsgType.PING, msg.header.session_id, msg.header.seq)
    return head + _PING_FIXED.pack(msg.padding_bytes) + bytes(msg.padding_bytes)


def encode_pong(msg: Pong) -> bytes:
    return _header(MsgType.PONG, msg.header.session_id, msg.header.seq)


def encode_error(msg: ErrorMsg) -> bytes:
    text = msg.message.encode("utf-8")[:1024]
    return _header(MsgType.ERROR, msg.header.session_id, msg.header.seq) + _ERROR_FIXED.pack(msg.code) + text


class _Reader:
    def __init__(self, payload: bytes, offset: int) -> None:
        self.buf = memoryview(payload)
        self.pos = offset

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.pos + size > len(self.buf):
            raise WireError(f"truncated message: {what} needs {size} bytes, {len(self.buf) - self.pos} left")
        view = self.buf[self.pos : self.pos + size]
        self.pos += size
        return view

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype).copy()

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise WireError(f"{len(self.buf) - self.pos} trailing bytes")


def _read_sampling(reader: _Reader, flags: int) -> SamplingConfig | None:
    if not flags & _F_SAMPLED:
        return None
    temperature, top_p, top_k, seed = reader.unpack(_SAMPLING, "sampling")
    try:
        return SamplingConfig(
            temperature=temperature, top_p=min(top_p, 1.0), top_k=top_k,
            seed=seed if flags & _F_SEED else None,
        )
    except ValueError as exc:
        raise WireError(f"bad sampling parameters: {exc}") from exc


def _read_top_n(reader: _Reader) -> int:
    (n,) = reader.unpack(_U8, "logprobs alternatives")
    if n > MAX_TOP_LOGPROBS:
        raise WireError(f"{n} logprob alternatives exceed {MAX_TOP_LOGPROBS}")
    return int(n)


def _read_logprobs(reader: _Reader, expected: int) -> Logprobs | None:
    if reader.pos == len(reader.buf):
        return None
    n, m = reader.unpack(_LOGPROBS_FIXED, "logprobs header")
    if n > MAX_TOP_LOGPROBS or m != expected:
        raise WireError(f"logprobs for {m} tokens with {n} alternatives; expected {expected} tokens, "
                        f"at most {MAX_TOP_LOGPROBS} alternatives")
    chosen = reader.array(_F32, m, "logprobs")
    top_ids = reader.array(_I32, m * n, "logprob ids").reshape(m, n)
    top = reader.array(_F32, m * n, "logprob alternatives").reshape(m, n)
    return Logprobs(chosen, top_ids, top)


def decode(payload: bytes) -> Message:
    if len(payload) < _HEADER.size:
        raise WireError(f"message of {len(payload)} bytes is shorter than the header")
    magic, version, kind, session_id, seq = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise WireError("not an aiflow message (bad magic)")
    if version != VERSION:
        raise WireError(f"unsupported protocol version {version}")
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise WireError(f"unknown message type {kind}") from None
    header = Header(msg_type, session_id, seq)
    reader = _Reader(payload, _HEADER.size)
    msg: Message
    if msg_type is MsgType.VERIFY:
        flags, base_len, k = reader.unpack(_VERIFY_FIXED, "verify header")
        if k > MAX_DRAFT_LEN:
            raise WireError(f"draft of {k} tokens exceeds the limit of {MAX_DRAFT_LEN}")
        context = sampling = None
        logprobs: int | None = None
        images: tuple[ImagePayload, ...] = ()
        if flags & _F_CONTEXT:
            (n,) = reader.unpack(_CONTEXT_LEN, "context length")
            if not 1 <= n <= MAX_CONTEXT_TOKENS:
                raise WireError(f"context of {n} tokens is outside 1..{MAX_CONTEXT_TOKENS}")
            context = reader.array(_I32, n, "context")
            sampling = _read_sampling(reader, flags)
            if flags & _F_LOGPROBS:
                logprobs = _read_top_n(reader)
            images = _read_images(reader) if flags & _F_IMAGES else ()
        elif flags & _F_IMAGES:
            raise WireError("images travel only with a context")
        draft = reader.array(_I32, k, "draft")
        q_ids = q_probs = None
        if reader.pos < len(reader.buf):
            (top_k,) = reader.unpack(_SPARSE_K, "draft distribution size")
            if not 1 <= top_k <= MAX_DRAFT_TOP_K:
                raise WireError(f"draft distribution size {top_k} is outside 1..{MAX_DRAFT_TOP_K}")
            q_ids = reader.array(_I32, k * top_k, "draft distribution ids").reshape(k, top_k)
            q_probs = reader.array(_F32, k * top_k, "draft distribution probabilities").reshape(k, top_k)
            if not np.all(np.isfinite(q_probs)) or np.any(q_probs < 0):
                raise WireError("draft probabilities must be finite and non-negative")
        msg = VerifyRequest(header, base_len, draft, context, sampling, q_ids, q_probs, logprobs, images)
    elif msg_type is MsgType.VERIFY_RESULT:
        status, accepted, next_token, verify_us, committed = reader.unpack(_VERIFY_RESP, "verify result")
        try:
            verify_status = VerifyStatus(status)
        except ValueError:
            raise WireError(f"unknown verify status {status}") from None
        lp = _read_logprobs(reader, accepted + 1) if verify_status is VerifyStatus.OK else None
        msg = VerifyResult(header, verify_status, accepted, next_token, verify_us, committed, lp)
    elif msg_type is MsgType.GENERATE:
        flags, max_new, n = reader.unpack(_GEN_FIXED, "generate header")
        if not 1 <= n <= MAX_CONTEXT_TOKENS:
            raise WireError(f"prompt of {n} tokens is outside 1..{MAX_CONTEXT_TOKENS}")
        if flags & _F_CONTINUE:
            if flags & ~(_F_CONTINUE | _F_MIN_TOKENS):
                raise WireError("a continuing GENERATE carries no prompt, sampling, logprobs or images")
            min_tokens = reader.unpack(_U32, "min tokens")[0] if flags & _F_MIN_TOKENS else 0
            msg = GenerateRequest(header, np.zeros(0, np.int32), max_new, None, min_tokens, continue_from=n)
            reader.finish()
            return msg
        prompt_ids = reader.array(_I32, n, "prompt")
        sampling = _read_sampling(reader, flags)
        min_tokens = reader.unpack(_U32, "min tokens")[0] if flags & _F_MIN_TOKENS else 0
        top_n = _read_top_n(reader) if flags & _F_LOGPROBS else None
        gen_images = _read_images(reader) if flags & _F_IMAGES else ()
        msg = GenerateRequest(header, prompt_ids, max_new, sampling, min_tokens, top_n, gen_images)
    elif msg_type is MsgType.TOKENS:
        done, count = reader.unpack(_TOKENS_FIXED, "tokens header")
        ids = reader.array(_I32, count, "tokens")
        msg = Tokens(header, ids, bool(done), _read_logprobs(reader, count))
    elif msg_type is MsgType.RELEASE:
        msg = Release(header)
    elif msg_type is MsgType.PING:
        (padding,) = reader.unpack(_PING_FIXED, "probe padding length")
        if padding > MAX_PROBE_PADDING_BYTES:
            raise WireError(f"probe padding of {padding} bytes exceeds {MAX_PROBE_PADDING_BYTES}")
        reader.take(padding, "probe padding")
        msg = Ping(header, padding)
    elif msg_type is MsgType.PONG:
        msg = Pong(header)
    else:
        (code,) = reader.unpack(_ERROR_FIXED, "error code")
        text = bytes(reader.take(len(reader.buf) - reader.pos, "error text")).decode("utf-8", "replace")
        msg = ErrorMsg(header, code, text)
    reader.finish()
    return msg


def verify_request_size(k: int, draft_top_k: int = 0, context_len: int = 0) -> int:
    """Bytes of a VERIFY message, for the cost model (context_len > 0 when the context rides along)."""
    size = _HEADER.size + _VERIFY_FIXED.size + 4 * k
    if context_len:
        size += _CONTEXT_LEN.size + 4 * context_len
    if draft_top_k:
        size += _SPARSE_K.size + 8 * k * draft_top_k
    return size


VERIFY_RESULT_SIZE = _HEADER.size + _VERIFY_RESP.size
TOKENS_MESSAGE_SIZE = _HEADER.size + _TOKENS_FIXED.size + 4  # one streamed token
PING_BASE_SIZE = _HEADER.size + _PING_FIXED.size
PONG_SIZE = _HEADER.size
