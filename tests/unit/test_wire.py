from __future__ import annotations

import numpy as np
import pytest

from aiflow_ray.config import SamplingConfig
from aiflow_ray.network import wire

SID = bytes(range(16))


def _header(kind: wire.MsgType, seq: int = 3) -> wire.Header:
    return wire.Header(kind, SID, seq)


def test_verify_roundtrip_greedy_draft_only() -> None:
    req = wire.VerifyRequest(_header(wire.MsgType.VERIFY), base_len=17, draft_ids=np.array([1, 2, 3], np.int32))
    payload = wire.encode_verify(req)
    assert len(payload) == wire.verify_request_size(3) == 24 + 7 + 12
    out = wire.decode(payload)
    assert isinstance(out, wire.VerifyRequest)
    assert out.base_len == 17 and out.draft_ids.tolist() == [1, 2, 3] and out.context is None


def test_verify_roundtrip_with_context_and_sparse_draft_distribution() -> None:
    sampling = SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, seed=5, draft_top_k=2)
    q_ids = np.array([[1, 4], [2, 9]], np.int32)
    q_probs = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
    req = wire.VerifyRequest(_header(wire.MsgType.VERIFY), 0, np.array([1, 2], np.int32),
                             context=np.array([5, 6, 7], np.int32), sampling=sampling, q_ids=q_ids, q_probs=q_probs)
    payload = wire.encode_verify(req)
    assert len(payload) == wire.verify_request_size(2, draft_top_k=2, context_len=3) + 20  # + sampling block
    out = wire.decode(payload)
    assert isinstance(out, wire.VerifyRequest)
    assert out.context is not None and out.context.tolist() == [5, 6, 7]
    assert out.sampling is not None and out.sampling.seed == 5 and out.sampling.top_k == 40
    assert out.sampling.temperature == pytest.approx(0.7)
    np.testing.assert_array_equal(out.q_ids, q_ids)
    np.testing.assert_array_equal(out.q_probs, q_probs)


def test_other_messages_roundtrip() -> None:
    res = wire.VerifyResult(_header(wire.MsgType.VERIFY_RESULT), wire.VerifyStatus.OK, 2, 99, 1234, 50)
    assert wire.decode(wire.encode_verify_result(res)) == res
    assert len(wire.encode_verify_result(res)) == wire.VERIFY_RESULT_SIZE
    gen = wire.GenerateRequest(_header(wire.MsgType.GENERATE), np.array([9, 151_643, 0], np.int32), 64, None)
    back = wire.decode(wire.encode_generate(gen))
    assert isinstance(back, wire.GenerateRequest) and back.prompt_ids.tolist() == [9, 151_643, 0]
    assert (back.header, back.max_new_tokens, back.sampling) == (gen.header, 64, None)
    with pytest.raises(wire.WireError, match="prompt of 0 tokens"):
        wire.decode(wire.encode_generate(wire.GenerateRequest(gen.header, np.zeros(0, np.int32), 64, None)))
    toks = wire.decode(wire.encode_tokens(wire.Tokens(_header(wire.MsgType.TOKENS), np.array([4], np.int32), True)))
    assert isinstance(toks, wire.Tokens) and toks.token_ids.tolist() == [4] and toks.done
    err = wire.decode(wire.encode_error(wire.ErrorMsg(_header(wire.MsgType.ERROR), 400, "bad")))
    assert isinstance(err, wire.ErrorMsg) and err.message == "bad"
    ping = wire.Ping(_header(wire.MsgType.PING), 300)
    assert wire.decode(wire.encode_ping(ping)) == ping
    assert len(wire.encode_ping(ping)) == wire.PING_BASE_SIZE + 300


def test_probes_are_bounded_and_answered_only_as_probes() -> None:
    from aiflow_ray.tiers.edge import answer_ping

    with pytest.raises(wire.WireError, match="padding"):
        wire.encode_ping(wire.Ping(_header(wire.MsgType.PING), wire.MAX_PROBE_PADDING_BYTES + 1))
    forged = wire.encode_ping(wire.Ping(_header(wire.MsgType.PING), 8))[:-8]  # claims 8 bytes, carries none
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode(forged)
    pong = wire.decode(answer_ping(wire.encode_ping(wire.Ping(_header(wire.MsgType.PING), 16))))
    assert isinstance(pong, wire.Pong)
    release = wire.encode_release(wire.Release(_header(wire.MsgType.RELEASE)))
    refused = wire.decode(answer_ping(release))
    assert isinstance(refused, wire.ErrorMsg) and "not a probe" in refused.message


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "shorter than the header"),
        (b"XX" + bytes(22), "bad magic"),
        (b"AF\x09\x01" + bytes(20), "unsupported protocol version"),
        (b"AF" + bytes([wire.VERSION, 0x63]) + bytes(20), "unknown message type"),
    ],
)
def test_malformed_headers_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload)


def test_truncated_oversized_and_trailing_payloads_are_rejected() -> None:
    good = wire.encode_verify(wire.VerifyRequest(_header(wire.MsgType.VERIFY), 1, np.array([1, 2], np.int32)))
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode(good[:-1])
    with pytest.raises(wire.WireError, match=r"trailing|distribution size"):
        wire.decode(good + b"\x00")
    huge_k = bytearray(good)
    huge_k[24 + 5 : 24 + 7] = (1000).to_bytes(2, "little")
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode(bytes(huge_k))


def test_edge_answers_garbage_with_an_error_message(tiny_pipeline) -> None:
    reply = wire.decode(tiny_pipeline.edge.handle(b"AF\x01\x01" + bytes(20) + b"\x00"))
    assert isinstance(reply, wire.ErrorMsg) and reply.code == 400
    out_of_vocab = wire.encode_verify(wire.VerifyRequest(
        _header(wire.MsgType.VERIFY), 0, np.array([10**6], np.int32), context=np.array([1], np.int32)))
    reply = wire.decode(tiny_pipeline.edge.handle(out_of_vocab))
    assert isinstance(reply, wire.ErrorMsg) and "outside the vocabulary" in reply.message


def _logprobs(m: int, n: int) -> wire.Logprobs:
    rng = np.random.default_rng(m * 10 + n)
    return wire.Logprobs(-rng.random(m).astype(np.float32), rng.integers(0, 100, (m, n)).astype(np.int32),
                         -rng.random((m, n)).astype(np.float32))


def test_logprobs_and_min_tokens_roundtrip() -> None:
    req = wire.VerifyRequest(_header(wire.MsgType.VERIFY), 0, np.array([1, 2], np.int32),
                             context=np.array([5, 6], np.int32), logprobs=3)
    out = wire.decode(wire.encode_verify(req))
    assert isinstance(out, wire.VerifyRequest) and out.logprobs == 3 and out.draft_ids.tolist() == [1, 2]
    lp = _logprobs(3, 2)  # accepted 2 + the correction or bonus token
    res = wire.VerifyResult(_header(wire.MsgType.VERIFY_RESULT), wire.VerifyStatus.OK, 2, 9, 10, 4, lp)
    payload = wire.encode_verify_result(res)
    assert len(payload) == wire.VERIFY_RESULT_SIZE + 3 + 3 * (4 + 2 * 8)  # only what was asked for
    back = wire.decode(payload)
    assert isinstance(back, wire.VerifyResult) and back.logprobs is not None
    np.testing.assert_array_equal(back.logprobs.top_ids, lp.top_ids)
    np.testing.assert_array_equal(back.logprobs.chosen, lp.chosen)
    gen = wire.GenerateRequest(_header(wire.MsgType.GENERATE), np.array([5], np.int32), 64, None, min_tokens=64,
                               logprobs=0)
    back = wire.decode(wire.encode_generate(gen))
    assert isinstance(back, wire.GenerateRequest) and (back.min_tokens, back.logprobs) == (64, 0)
    toks = wire.Tokens(_header(wire.MsgType.TOKENS), np.array([4], np.int32), False, _logprobs(1, 0))
    decoded = wire.decode(wire.encode_tokens(toks))
    assert isinstance(decoded, wire.Tokens) and decoded.logprobs is not None and len(decoded.logprobs) == 1


def test_logprobs_blocks_are_bounded() -> None:
    too_many = wire.VerifyRequest(_header(wire.MsgType.VERIFY), 0, np.array([1], np.int32),
                                  context=np.array([5], np.int32), logprobs=wire.MAX_TOP_LOGPROBS + 1)
    with pytest.raises(wire.WireError, match="alternatives"):
        wire.decode(wire.encode_verify(too_many))
    # A result whose logprobs cover another number of tokens than it emits is malformed.
    res = wire.VerifyResult(_header(wire.MsgType.VERIFY_RESULT), wire.VerifyStatus.OK, 2, 9, 10, 4, _logprobs(2, 1))
    with pytest.raises(wire.WireError, match="expected 3 tokens"):
        wire.decode(wire.encode_verify_result(res))


def test_a_messages_session_id_is_read_without_decoding_it() -> None:
    req = wire.VerifyRequest(_header(wire.MsgType.VERIFY), base_len=5, draft_ids=np.array([7], np.int32))
    for payload in (wire.encode_verify(req), wire.encode_verify_result(wire.VerifyResult(
            _header(wire.MsgType.VERIFY_RESULT), wire.VerifyStatus.OK, 1, 9, 10, 6))):
        assert wire.peek_session_id(payload) == SID == wire.decode(payload).header.session_id
    assert wire.peek_session_id(b"AF") is None  # too short to hold a header
