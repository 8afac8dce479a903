"""HTTP request and response bodies: the native API and the OpenAI-compatible subset."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiflow_ray.config import MAX_DRAFT_LEN

PathChoice = Literal["auto", "on-device", "device-edge", "device-edge-cloud", "server-only"]
QualityChoice = Literal["exact", "fast", "grounded"]
MAX_PROMPT_CHARS = 100_000


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class GenerateBody(Body):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="Input text.")
    path: PathChoice = Field("auto", description="auto lets the router choose.")
    quality: QualityChoice = Field("exact", description="exact: the large model's output; fast: the small "
                                   "model's is fine; grounded: answer from the knowledge base.")
    draft_len: int | Literal["auto"] | None = Field(None, description="k, 'auto' (adaptive), or None (router).")
    max_tokens: int = Field(64, ge=1, description="Tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    chat: bool = Field(True, description="Apply the chat template.")
    link_id: str = Field("device-0", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Which device link.")
    beam_width: int = Field(4, ge=1, le=16, description="Cloud path: beams.")
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0, description="Cloud path: beam length penalty.")
    retrieval_top_k: int = Field(4, ge=1, le=20, description="Cloud path: knowledge base chunks to use.")
    generation: Literal["beam", "speculative"] = Field(
        "beam", description="Cloud path: beam search in the cloud, or speculative decoding on the device and "
        "edge over the retrieved chunks.")
    query_encoding: Literal["text", "embedding"] = Field(
        "text", description="Cloud path: send the query text, or its embedding computed on the device.")
    stream: bool = False

    _prompt = field_validator("prompt")(lambda cls, v: _not_blank(v))

    @field_validator("draft_len")
    @classmethod
    def _k(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= MAX_DRAFT_LEN:
            raise ValueError(f"must be between 1 and {MAX_DRAFT_LEN}, 'auto' or null")
        return value


class CompletionBody(Body):
    model: str = Field(..., min_length=1)
    prompt: str | list[str] = Field(..., description="One prompt (a list of exactly one is accepted).")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="One completion per request.")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("exactly one prompt per request")
        if len(prompts[0]) > MAX_PROMPT_CHARS:
            raise ValueError(f"longer than {MAX_PROMPT_CHARS} characters")
        _not_blank(prompts[0])
        return value


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatBody(Body):
    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("messages")
    @classmethod
    def _has_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.content.strip() for m in value):
            raise ValueError("needs at least one non-empty user message")
        return value


class LinkUpdate(Body):
    bandwidth_bps: float | None = Field(None, gt=0, description="Bytes per second.")
    bandwidth: str | None = Field(None, description="Human form, e.g. '10KB/s'.")
    rtt_ms: float = Field(20.0, ge=0, le=10_000)


class KbSearchBody(Body):
    query: str = Field(..., min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1, le=100)

    _query = field_validator("query")(lambda cls, v: _not_blank(v))


class KbDocument(Body):
    source: str = Field(..., min_length=1, max_length=512, description="Stable id; re-ingesting it replaces it.")
    text: str = Field(..., min_length=1, max_length=1_000_000)
    title: str = Field("", max_length=512)

    _text = field_validator("text", "source")(lambda cls, v: _not_blank(v))


class KbIngestBody(Body):
    documents: list[KbDocument] = Field(..., min_length=1, max_length=1000)
