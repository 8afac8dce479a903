"""device-edge-cloud: a grounded answer, orchestrated by the device (as in the paper).

The query goes up through the edge to the cloud (text, or a 768-byte embedding computed on the
device); either the cloud answers with beam search over the retrieved chunks, or the chunks come
back and the device and edge decode over them speculatively (exact to the large model's greedy
answer). Both links are emulated and their bytes and seconds land in the trace per link.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from aiflow_ray.config import GenerateOptions, GroundingOptions
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.rag.prompting import grounded_messages
from aiflow_ray.tiers.cloud import BeamAnswer, GroundedRequest, Retrieval, RetrieveRequest
from aiflow_ray.tiers.device import GenerationResult, OnRound
from aiflow_ray.tiers.trace import Trace

LINKS = ("device-edge", "edge-cloud")


class CloudTransport(Protocol):
    """The cloud as the device sees it: ``CloudService`` in process, Serve handles in the cluster."""

    def retrieve(self, req: RetrieveRequest) -> Retrieval: ...

    def answer(self, req: GroundedRequest) -> BeamAnswer: ...


def question_of(opts: GenerateOptions) -> str:
    """What retrieval searches for: the last user turn of a conversation, else the prompt."""
    if opts.messages:
        return next((t.content for t in reversed(opts.messages) if t.role == "user"), opts.prompt)
    return opts.prompt


def run_grounded(opts: GenerateOptions, device_link: DuplexLink, cloud_link: DuplexLink, cloud: CloudTransport, *,
                 speculate: Callable[[list[dict[str, str]]], GenerationResult],
                 embed: Callable[[str], np.ndarray] | None = None, on_round: OnRound | None = None
                 ) -> GenerationResult:
    """``speculate(messages)`` runs the device-edge loop over the augmented prompt; ``embed(question)``
    computes the query embedding on the device (query_encoding 'embedding')."""
    grounding = opts.grounding or GroundingOptions()
    clock = device_link.clock
    links = {name: {"bytes_up": 0, "bytes_down": 0, "time_s": 0.0} for name in LINKS}
    stages: dict[str, float] = {}

    def hop(direction: str, nbytes: int) -> None:
        # Device -> edge -> cloud going up, the reverse coming down; the edge relays.
        order = [("device-edge", device_link), ("edge-cloud", cloud_link)]
        for name, link in order if direction == "up" else reversed(order):
            links[name][f"bytes_{direction}"] += nbytes
            links[name]["time_s"] += (link.up if direction == "up" else link.down).transfer(nbytes)

    question = question_of(opts)
    started = clock.now()
    if grounding.query_encoding == "embedding":
        if embed is None:
            raise ValueError("query_encoding 'embedding' needs an embedder on the device")
        t0 = time.perf_counter()
        vector = embed(question).astype("<f2")
        stages["device_embed_s"] = time.perf_counter() - t0
        query = RetrieveRequest(query_vector_f16=base64.b64encode(vector.tobytes()).decode(), top_k=grounding.top_k)
        query_bytes = vector.nbytes  # binary on a real wire; base64 only inside this emulation
    else:
        query = RetrieveRequest(query=question, top_k=grounding.top_k)
        query_bytes = len(question.encode())
    if on_round is not None:
        on_round([], None)  # lets the caller stop before anything is sent
    hop("up", query_bytes + 8)
    if grounding.generation == "beam":
        answer = cloud.answer(GroundedRequest(
            **query.model_dump(), question=question, beam_width=grounding.beam_width,
            length_penalty=grounding.length_penalty, max_new_tokens=opts.max_new_tokens))
        retrieval = answer.retrieval
        token_ids = list(answer.token_ids)
        hop("down", 4 * len(token_ids) + sum(len(h.chunk_id) for h in retrieval.hits) + 8)
        stages["cloud_generate_s"] = answer.compute_s
        trace = Trace(path="device-edge-cloud")
        trace.token_times_s = [clock.now() - started] * len(token_ids)  # beam search answers all at once
        trace.finish()
        if on_round is not None and token_ids:
            on_round(token_ids, None)
        result = GenerationResult(token_ids, answer.text, trace, prompt_tokens=answer.prompt_tokens)
        trace.retrieval = {"sum_logprob": answer.sum_logprob, "beam_width": grounding.beam_width}
    else:
        retrieval = cloud.retrieve(query)
        messages, used = grounded_messages(question, retrieval.hit_dicts())
        retrieval = retrieval.used(used)
        hop("down", sum(len(h.text.encode()) + len(h.chunk_id) for h in retrieval.hits) + 8)
        decode_started = clock.now()
        result = speculate(messages)
        trace = result.trace
        # The decode's clock starts after retrieval; the client's starts at the request.
        offset = decode_started - started
        trace.token_times_s = [t + offset for t in trace.token_times_s]
        trace.finish()
        trace.path = "device-edge-cloud"
        links["device-edge"]["bytes_up"] += trace.bytes_up
        links["device-edge"]["bytes_down"] += trace.bytes_down
        links["device-edge"]["time_s"] += trace.link_s
        stages["speculative_decode_s"] = clock.now() - decode_started
    stages.update(cloud_embed_s=retrieval.embed_s, search_s=retrieval.search_s)
    trace.links, trace.stages = links, stages
    trace.bytes_up = int(links["device-edge"]["bytes_up"])
    trace.bytes_down = int(links["device-edge"]["bytes_down"])
    trace.retrieval.update(
        query_encoding=grounding.query_encoding, generation=grounding.generation, num_chunks=retrieval.num_chunks,
        hits=[{"chunk_id": h.chunk_id, "source": h.source, "score": h.score} for h in retrieval.hits],
    )
    return result
