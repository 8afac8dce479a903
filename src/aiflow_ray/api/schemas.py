"""HTTP request and response bodies: the native API and the OpenAI-compatible subset."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from aiflow_ray.config import MAX_DRAFT_LEN, PathChoice, Quality
from aiflow_ray.config.generation import UploadMode
from aiflow_ray.network.wire import MAX_IMAGES, MAX_TOP_LOGPROBS
from aiflow_ray.vision.prompting import user_turn_text

MAX_PROMPT_CHARS = 100_000
# A data URL's characters: the request body limit bounds the total, the device's image limits each image.
MAX_IMAGE_URL_CHARS = 96 << 20



LINK_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # a device link id, in a body or in an admin path

class Body(BaseModel):
    # Strict: JSON types as the schema says them (`"seed": true` or `"max_tokens": "8"` is a 400 naming the
    # field, not silently read as 1 or 8); an integer still passes where a number is asked for.
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class GenerateBody(Body):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="Input text.")
    path: PathChoice = Field("auto", description="auto lets the router choose.")
    quality: Quality | None = Field(None, description="exact: the large model's output; fast: the small "
                                    "model's is fine; grounded: answer from the knowledge base. Unset: a forced "
                                    "path just runs, auto means exact.")
    draft_len: int | Literal["auto"] | None = Field(None, description="k, 'auto' (adaptive), or None (router).")
    max_tokens: int = Field(64, ge=1, description="Tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    chat: bool = Field(True, description="Apply the chat template.")
    link_id: str = Field("device-0", pattern=LINK_ID_PATTERN, description="Which device link.")
    beam_width: int = Field(4, ge=1, le=16, description="Cloud path: beams.")
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0, description="Cloud path: beam length penalty.")
    retrieval_top_k: int = Field(4, ge=1, le=20, description="Cloud path: knowledge base chunks to use.")
    generation: Literal["beam", "speculative"] = Field(
        "beam", description="Cloud path: beam search in the cloud, or speculative decoding on the device and "
        "edge over the retrieved chunks.")
    query_encoding: Literal["text", "embedding"] = Field(
        "text", description="Cloud path: send the query text, or its embedding computed on the device.")
    stream: bool = False
    min_tokens: int = Field(0, ge=0, description="An end-of-sequence token does not end the output before this "
                            "many tokens.")
    ignore_eos: bool = Field(False, description="Generate exactly max_tokens tokens.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Return the verifier's logprob of "
                                 "every output token with this many alternatives (device-edge, server-only).")
    images: list[Annotated[str, Field(max_length=MAX_IMAGE_URL_CHARS)]] | None = Field(
        None, max_length=MAX_IMAGES, description="Images as data URLs (JPEG, PNG, WebP), for a vision-language "
        "model; the prompt's <image> placeholders say where each goes (else they come first).")
    image_upload: UploadMode = Field("auto", description="What of each image crosses the device link: raw, resized "
                                     "(the verifier's input, lossless), jpeg, features, or auto.")

    _prompt = field_validator("prompt")(lambda cls, v: _not_blank(v))

    @field_validator("draft_len")
    @classmethod
    def _k(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= MAX_DRAFT_LEN:
            raise ValueError(f"must be between 1 and {MAX_DRAFT_LEN}, 'auto' or null")
        return value


class StreamOptions(Body):
    include_usage: bool = Field(False, description="Send a last chunk with the request's token usage.")
    continuous_usage_stats: bool = Field(False, description="Accepted for vLLM compatibility; usage comes last.")


class OpenAIBody(Body):
    """Fields the chat and completions endpoints share, with the extensions vLLM's servers accept
    (min_tokens, ignore_eos), which benchmark tools send to fix output lengths."""

    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="vLLM extension; 0 or -1 = off.")
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Only 0 (no penalty) is supported.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Only 0 (no penalty) is supported.")


class CompletionBody(OpenAIBody):
    prompt: str | list[str] = Field(..., description="One prompt (a list of exactly one is accepted).")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="Alternatives per token (legacy completions).")
    echo: Literal[False] = Field(False, description="Echoing the prompt is not supported.")

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


class TextPart(Body):
    """One part of a message's content: the openai SDK, LangChain and LiteLLM send text this way."""

    type: Literal["text"] = Field(..., description="A text part.")
    text: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ImageUrl(Body):
    url: str = Field(..., min_length=1, max_length=MAX_IMAGE_URL_CHARS,
                     description="A data URL (data:image/png;base64,...); http(s) URLs only where enabled.")
    detail: Literal["auto", "low", "high"] = Field("auto", description="Accepted; the model's tiling decides.")


class ImagePart(Body):
    """An image in a user message, OpenAI's shape."""

    type: Literal["image_url"] = Field(..., description="An image part.")
    image_url: ImageUrl


def _part_kind(value: object) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind) if isinstance(kind, str) else None


# Tagged by class name, so that an error inside a part names the part's field (messages.0.content.1.image_url),
# not the tag as well (errors.py drops class-like names from a location).
ContentPart = Annotated[Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
                        Discriminator(_part_kind, custom_error_type="invalid_part",
                                      custom_error_message="type must be 'text' or 'image_url'")]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] = Field(..., description="Text, or a list of text and image parts (in order).")
    name: str | None = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(value, list) and len(value) > 256:
            raise ValueError("at most 256 content parts")
        return value

    def text(self) -> str:
        """The text parts, joined (images left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_parts(self) -> list[tuple[int, ImagePart]]:
        """(index in content, part) of each image, in order."""
        if isinstance(self.content, str):
            return []
        return [(i, part) for i, part in enumerate(self.content) if isinstance(part, ImagePart)]

    def turn(self) -> dict[str, str]:
        # 'developer' is the newer name of 'system' in OpenAI's API; the chat templates know 'system'.
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        # An image part becomes the model's image placeholder, where it stood among the text parts.
        parts = [part.text if isinstance(part, TextPart) else None for part in self.content]
        return {"role": role, "content": user_turn_text(parts)}


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    logprobs: bool = Field(False, description="Return the verifier's logprob of every output token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token.")

    @field_validator("messages")
    @classmethod
    def _has_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and (m.text().strip() or m.image_parts()) for m in value):
            raise ValueError("needs at least one non-empty user message")
        for i, message in enumerate(value):
            parts = message.image_parts()
            if parts and message.role != "user":
                raise ValueError(f"messages[{i}].content[{parts[0][0]}]: only user messages may carry images")
        if sum(len(m.image_parts()) for m in value) > MAX_IMAGES:
            raise ValueError(f"more than {MAX_IMAGES} images")
        if sum(len(m.text()) for m in value) > MAX_PROMPT_CHARS:
            raise ValueError(f"longer than {MAX_PROMPT_CHARS} characters in all")
        return value

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class LinkUpdate(Body):
    bandwidth_bps: float | None = Field(
        None, ge=0, description="Bytes per second; 0 = outage: nothing moves until the bandwidth is raised again.")
    bandwidth: str | None = Field(None, description="Human form, e.g. '10KB/s'; '0' = outage.")
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


class ErrorDetail(BaseModel):
    message: str = Field(..., description="One sentence for a person.")
    type: str = Field(..., description="invalid_request_error (4xx) or unavailable (5xx).")
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: int = Field(..., description="The HTTP status.")


class ErrorBody(BaseModel):
    """Every error answer (OpenAI's shape)."""

    error: ErrorDetail


# Documented in the OpenAPI schema, so that clients and schema-driven fuzzers know every answer: one error
# shape for all of them (see api/errors.py); generation routes stream server-sent events when asked.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (400, "Invalid request: `param` names the field."), (401, "Missing or wrong key."),
        (403, "The key may not use this route."), (404, "Unknown model or route."),
        (413, "Request body too large."), (429, "Over the rate limit; see Retry-After."),
        (500, "A bug; details in the server's log."),
        (503, "No tier can serve it now (starting, down, saturated); see Retry-After."))}
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"description": "The answer; with `stream: true`, server-sent events.",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "description": "One server-sent event.",
              "properties": {"event": {"type": "string"},
                             "data": {"type": "string", "description": "A JSON object, or [DONE] last."}}}}}}}
