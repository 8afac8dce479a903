"""What one generation is: sampling, the emulated link, draft length, model pair, request options.

Also the project's vocabulary, each word defined once here: path names, quality levels, tier names.
``extra="forbid"`` everywhere so typos fail loudly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiflow_ray.units import parse_bandwidth_bps

MAX_DRAFT_LEN = 64
DEFAULT_MAX_DRAFT_LEN = 24  # the largest k an adaptive policy or the router picks unless configured
MAX_NEW_TOKENS = 4096
MAX_CONTEXT_TOKENS = 32_768  # prompt + output: the trained context of the Qwen2.5 pairs

PathName = Literal["on-device", "device-edge", "device-edge-cloud", "server-only"]
PATHS: tuple[PathName, ...] = get_args(PathName)
PathChoice = Literal["auto"] | PathName  # what a client may ask for: a path, or the router's choice
Quality = Literal["exact", "fast", "grounded"]
TierName = Literal["device", "edge", "cloud"]
TIERS: tuple[TierName, ...] = get_args(TierName)
# Paths whose output tokens all come from the verifier's distribution, which logprobs report.
LOGPROB_PATHS: tuple[PathName, ...] = ("device-edge", "server-only")
EngineName = Literal["hf", "llama_cpp", "vllm"]  # the runtimes behind the Engine protocol
# Which model pair; not to be confused with a deployment profile. tiny-vlm: random InternVL test models;
# tiny-qwen-vl: random Qwen2-VL test models; caption: the InternVL captioning pair the project trains on
# composed Fashion-MNIST scenes.
ModelPreset = Literal["default", "tiny", "tiny-vlm", "tiny-qwen-vl", "caption"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(StrictModel):
    """How the target distribution is defined; temperature 0 means greedy."""

    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy (argmax).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens of the target; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass of the target; 1 = off.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    draft_top_k: int = Field(
        16,
        ge=1,
        le=256,
        description="Support size of the drafter's sampling distribution. The drafter samples from its "
        "top-k renormalised distribution and sends exactly that sparse distribution with each draft "
        "token, so rejection sampling at the edge is exact while the uplink stays O(draft).",
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TraceStep(StrictModel):
    at_s: float = Field(..., ge=0.0, description="Time since the link started, seconds.")
    bandwidth_bps: float = Field(..., gt=0.0, description="Bytes per second from at_s on.")


class LinkConfig(StrictModel):
    """An emulated link: delay = one-way latency + bytes / bandwidth(t)."""

    bandwidth_bps: float = Field(1e6, gt=0.0, description="Constant bandwidth, bytes per second.")
    rtt_s: float = Field(0.02, ge=0.0, le=10.0, description="Round-trip latency (twice the one-way).")
    steps: tuple[TraceStep, ...] = Field((), description="Optional step trace; overrides bandwidth_bps.")
    trace_csv: Path | None = Field(None, description="CSV trace with columns at_s,bandwidth_bps.")
    virtual_time: bool = Field(
        False,
        description="Advance a virtual clock instead of sleeping: compute is timed for real, link delays "
        "are added without waiting (benchmarks sweep several bandwidths over one compute run).",
    )

    @field_validator("bandwidth_bps", mode="before")
    @classmethod
    def _parse_bw(cls, value: object) -> object:
        return parse_bandwidth_bps(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_trace(self) -> LinkConfig:
        if self.steps and self.trace_csv is not None:
            raise ValueError("give either steps or trace_csv, not both")
        return self


class DraftPolicyConfig(StrictModel):
    """Draft length: a fixed k, or adaptive from measured acceptance, compute times and link."""

    policy: Literal["fixed", "adaptive"] = Field("fixed", description="Registered policy name.")
    draft_len: int = Field(4, ge=1, le=MAX_DRAFT_LEN, description="k for the fixed policy.")
    max_draft_len: int = Field(DEFAULT_MAX_DRAFT_LEN, ge=1, le=MAX_DRAFT_LEN,
                               description="Largest k adaptive may pick.")
    prior_acceptance: float = Field(
        0.7, gt=0.0, lt=1.0, description="Acceptance assumed before any round was observed."
    )
    prior_weight_tokens: float = Field(
        8.0, ge=0.0, description="How many draft tokens of evidence the prior is worth."
    )
    acceptance_memory_rounds: float = Field(
        10.0, ge=1.0, description="Rounds over which acceptance evidence fades (1/e): short enough to "
        "follow a request from code to prose, long enough to average out single rounds."
    )


class ModelPairConfig(StrictModel):
    """Which drafter and verifier to load; names from the registry, local dirs or hub ids."""

    drafter: str = Field("qwen2.5-coder-0.5b-instruct", min_length=1, description="Small model.")
    verifier: str = Field("qwen2.5-coder-1.5b-instruct", min_length=1, description="Large model.")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="auto = bf16 where the device supports it, else fp32."
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N.")

    @classmethod
    def for_preset(cls, preset: ModelPreset, dtype: str = "auto", device: str = "auto") -> ModelPairConfig:
        if preset != "default":  # the registered names of a pair built here are <preset>-drafter/-verifier
            # Small models built here are exactness fixtures (and fast anyway): fp32 unless asked otherwise.
            return cls(drafter=f"{preset}-drafter", verifier=f"{preset}-verifier",
                       dtype="float32" if dtype == "auto" else dtype, device=device)
        return cls(dtype=dtype, device=device)


class ChatTurn(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=200_000)


UploadMode = Literal["auto", "raw", "resized", "jpeg", "features"]  # how an image crosses the device link


class ImageSource(StrictModel):
    """One image of a request as the client sent it (the bytes of a data URL, not yet decoded: the device
    tier decodes them), with the request field it came from, which every error about it names."""

    data: bytes = Field(..., description="The encoded image (JPEG, PNG or WebP).")
    field: str = Field(..., max_length=200, description="Where the image was in the request, e.g. images[0].")


class GroundingOptions(StrictModel):
    """How the device-edge-cloud path grounds an answer in the knowledge base."""

    top_k: int = Field(4, ge=1, le=20, description="Chunks retrieved and put in the prompt.")
    generation: Literal["beam", "speculative"] = Field(
        "beam", description="beam: the cloud's large model answers with beam search; speculative: the cloud "
        "returns the chunks and the device and edge decode over them (exact to the large model's greedy).",
    )
    beam_width: int = Field(4, ge=1, le=16, description="Beams, for generation 'beam'.")
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0, description="Beam length penalty.")
    query_encoding: Literal["text", "embedding"] = Field(
        "text", description="What the device sends for retrieval: the query text, or its embedding computed "
        "on the device (384 float16 values, 768 bytes).",
    )


class GenerateOptions(StrictModel):
    """One generation request, as every tier sees it: what the ingress sends the device tier, and what the
    CLI and the benchmarks run in process. The emulated link's settings travel here and only here."""

    prompt: Annotated[str, Field(min_length=1, max_length=200_000, description="Input text.")]
    messages: tuple[ChatTurn, ...] | None = Field(
        None, description="A chat conversation; when given it is encoded instead of the prompt."
    )
    path: PathName = Field("device-edge", description="Which tiers run the request.")
    draft_len: int | Literal["auto"] = Field(4, description="Draft length k (>= 1) or 'auto'.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate.")
    chat: bool = Field(True, description="Wrap the prompt in the model's chat template.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    link_id: str = Field("device-0", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Which device's link.")
    grounding: GroundingOptions | None = Field(None, description="Set for the device-edge-cloud path.")
    min_tokens: int = Field(
        0, ge=0, le=MAX_NEW_TOKENS, description="An end-of-sequence token does not end the generation before this "
        "many tokens (it is emitted and decoding goes on); max_new_tokens here means 'ignore EOS'.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return the verifier's log-probability of every output token and of its n "
        "most likely alternatives (paths with the verifier's distribution only); None = off.")
    device_fallback: bool = Field(
        False, description="The small model's output is acceptable (quality 'fast'): when the device-edge link or "
        "the edge fails mid-generation, the device finishes the output on its own instead of failing.")
    deadline_s: float | None = Field(None, gt=0, description="Time left for this generation when the tier receives "
                                     "it; None = the tier's own request deadline.")
    images: tuple[ImageSource, ...] = Field((), description="Images, in the order of the prompt's image "
                                            "placeholders.")
    image_upload: UploadMode = Field(
        "auto", description="What of each image crosses the device link: raw (the client's bytes, metadata "
        "removed), resized (the verifier's preprocessed tiles, lossless), jpeg (those tiles, lossy), features (the "
        "shared vision encoder's output), auto (the fewest bytes without changing the output).")
    switch_tpot_s: float | None = Field(
        None, gt=0, description="Set by the router for an auto-routed device-edge request: server-only's "
        "predicted time per output token. When the request's rounds turn out slower than that, it goes on "
        "server-only from the edge's session (the same verifier, so the same output); None = never.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("draft_len")
    @classmethod
    def _k_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be between 1 and {MAX_DRAFT_LEN} or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _path_fields(self) -> GenerateOptions:
        if self.logprobs is not None and self.path not in LOGPROB_PATHS:
            raise ValueError(f"logprobs need the verifier's distribution: path {self.path!r} has none "
                             f"(use one of {', '.join(LOGPROB_PATHS)})")
        return self

    def stops_at(self, emitted: int) -> bool:
        """Whether an end-of-sequence token that would be output token number ``emitted`` ends the output."""
        return emitted >= self.min_tokens

    def prompt_input(self) -> str | list[dict[str, str]]:
        """What the engine encodes: the conversation when there is one, else the prompt."""
        if self.messages:
            return [turn.model_dump() for turn in self.messages]
        return self.prompt

    def draft_policy(self) -> DraftPolicyConfig:
        if self.draft_len == "auto":
            return DraftPolicyConfig(policy="adaptive")
        return DraftPolicyConfig(policy="fixed", draft_len=self.draft_len)
