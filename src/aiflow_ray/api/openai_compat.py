"""OpenAI-compatible request mapping and response shapes (chat and legacy completions).

A chat or completion request becomes a native ``GenerateBody`` (the served model name picks the
quality: the drafter's name means the device's model, any other name the large model); the results
come back in OpenAI's shapes: ``usage`` with prompt and completion tokens, a final usage chunk when
``stream_options.include_usage`` is set, and ``logprobs`` in the chat or legacy completions form.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiflow_ray.api.schemas import ChatBody, CompletionBody, GenerateBody, OpenAIBody
from aiflow_ray.tiers.results import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def legacy_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The completions endpoint's older form: parallel lists, alternatives as {token: logprob}."""
    offsets, at = [], offset
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.top_logprobs} for e in entries],
            "text_offset": offsets}


@dataclass
class OpenAIRequest:
    """One chat or completion request, mapped to the native API, plus what its answers need."""

    body: OpenAIBody
    native: GenerateBody
    messages: list[dict[str, str]] | None
    chat: bool
    max_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    sent_role: bool = False
    text_offset: int = 0
    image_fields: list[str] = field(default_factory=list)  # [images] where each image was in the body

    @classmethod
    def from_body(cls, body: ChatBody | CompletionBody, drafter_name: str) -> OpenAIRequest:
        chat = isinstance(body, ChatBody)
        if isinstance(body, ChatBody):
            max_tokens = body.max_completion_tokens or body.max_tokens or 256
            messages: list[dict[str, str]] | None = [m.turn() for m in body.messages]
            # The native prompt is informative only (the messages are what is encoded); a user turn may be an image.
            prompt = next((m.text() for m in reversed(body.messages) if m.role == "user" and m.text().strip()),
                          "(image)")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            images = [(f"messages[{i}].content[{j}].image_url", part.image_url.url)
                      for i, m in enumerate(body.messages) for j, part in m.image_parts()]
        else:
            max_tokens = body.max_completion_tokens or body.max_tokens or 16
            messages = None
            prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            logprobs = body.logprobs
            images = []
        on_device = body.model == drafter_name
        native = GenerateBody(
            prompt=prompt, path="on-device" if on_device else "auto", quality=None if on_device else "exact",
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
            seed=body.seed, stream=body.stream, chat=chat, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
            logprobs=logprobs, images=[url for _, url in images] or None)
        return cls(body, native, messages, chat, max_tokens, image_fields=[name for name, _ in images])

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def _finish(self, num_tokens: int, stopped: bool = False) -> str:
        return "stop" if stopped or num_tokens < self.max_tokens else "length"

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        if self.chat:
            return {"content": [e.to_dict() for e in entries]}
        out = legacy_logprobs(entries, self.text_offset)
        self.text_offset += sum(len(e.token) for e in entries)
        return out

    def response(self, text: str, num_tokens: int, prompt_tokens: int, logprobs: list[TokenLogprob] | None,
                 trace: dict[str, Any], route: dict[str, Any]) -> dict[str, Any]:
        text, stopped = apply_stop(text, self.body.stop)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self._finish(num_tokens, stopped),
                                  "logprobs": self._logprobs(logprobs)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self._id(), "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": [choice],
                "usage": usage(prompt_tokens, num_tokens), "aiflow_trace": trace, "aiflow_route": route}

    def chunk(self, text: str, logprobs: list[TokenLogprob] | None, finish_num_tokens: int | None = None
              ) -> dict[str, Any]:
        """One stream chunk; ``finish_num_tokens`` is set on the last one (it carries finish_reason)."""
        finish = None if finish_num_tokens is None else self._finish(finish_num_tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": self._logprobs(logprobs)}
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if not self.sent_role:
                delta["role"] = "assistant"
                self.sent_role = True
            choice["delta"] = delta
        else:
            choice["text"] = text
        out: dict[str, Any] = {"id": self._id(), "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.body.model, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return out

    def usage_chunk(self, prompt_tokens: int, num_tokens: int) -> dict[str, Any]:
        return {"id": self._id(), "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": [],
                "usage": usage(prompt_tokens, num_tokens)}

    def _id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}"
