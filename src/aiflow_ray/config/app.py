"""The serving application's arguments: one pydantic model for Python, YAML and RayService alike."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from aiflow_ray.config.generation import (
    DEFAULT_MAX_DRAFT_LEN,
    MAX_CONTEXT_TOKENS,
    MAX_DRAFT_LEN,
    EngineName,
    LinkConfig,
    ModelPairConfig,
    ModelPreset,
    StrictModel,
)
from aiflow_ray.config.images import ImageLimits


class AutoscalingArgs(StrictModel):
    """Serve's request-based autoscaling of one deployment.

    Serve counts a deployment's requests as those queued at its callers' handles plus those inside its
    replicas, averaged over ``look_back_period_s``. On the edge and the cloud that count is their work
    queue: a replica admits a call, then waits for its one engine lock (``LoadTracker.queued``) and runs
    (``LoadTracker.ongoing``), so a mean above 1 per replica is a queue of verifications or beam searches.
    The defaults are the real models' (the local profile); docs/benchmarks/load.md has the measurements.
    """

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Ongoing requests per replica to aim for "
                                           "(queued at the callers' handles plus inside the replica).")
    upscale_delay_s: float = Field(15.0, ge=0, description="Load must persist this long before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idleness must persist this long before scaling down.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the request count is averaged over.")
    # Serve's 10 s default makes every decision up to 10 s late; in Ray 2.60 this field is still the
    # handles' push period (the environment variables meant to replace it are read nowhere yet).
    metrics_interval_s: float = Field(1.0, gt=0, description="How often the callers' handles report their counts.")
    graceful_shutdown_timeout_s: float = Field(
        300.0, gt=0, description="A replica that is scaled down finishes its requests for at most this long before "
        "it is killed: the longest generation allowed (1024 tokens at the 1.5B verifier's slowest measured "
        "0.25 s per token, plus prefill). Serve's 20 s killed a 22 s request.")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must exceed metrics_interval_s (a window needs several reports)")
        return self


class VllmArgs(StrictModel):
    """Settings of a tier's vLLM engine (``engine: vllm``); see engines/vllm.py for how sessions map onto it."""

    max_model_len: int = Field(4096, ge=256, le=131_072, description="Longest sequence (prompt + output).")
    kv_cache_bytes: int | None = Field(
        None, ge=1 << 26, description="KV cache size in bytes. CPU: default 1 GiB (vLLM would reserve 92% of "
        "the node's memory). GPU: null = sized by gpu_memory_utilization.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=0.98, description="GPU memory share for weights and "
                                          "KV cache when kv_cache_bytes is null.")
    max_num_seqs: int = Field(64, ge=1, le=1024, description="Requests batched into one engine step.")
    enforce_eager: bool | None = Field(None, description="No CUDA graphs / compilation (default: eager on CPU, "
                                       "graphs on GPU, where they remove the launch overhead).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto = bfloat16 on GPUs and "
                                                                          "CPUs with bf16 instructions, else float32.")


class TierArgs(StrictModel):
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels a replica must run on, e.g. {tier: edge}."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (GPU clusters).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100.")
    engine: EngineName = Field("hf", description="Runtime of the tier's model: hf (torch/transformers, the exact "
                               "reference), llama_cpp (the quantized GGUF as released) or vllm (continuous "
                               "batching: verifications of many devices share engine steps).")
    vllm: VllmArgs = Field(default_factory=VllmArgs, description="vLLM settings, used when engine is vllm.")
    threads: int | None = Field(
        None, ge=1, description="Compute threads of the tier's engine, torch or llama.cpp (default: all cores of "
        "the node; Ray would "
        "otherwise cap them at num_cpus, and the tiers of one request take turns rather than compete).")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica serves at once.")
    shared_decodes: bool = Field(True, description="The device and the edge on llama_cpp (text models): run the "
                                 "forwards that sessions ask for at once in one decode, as llama-server's slots do "
                                 "(more tokens a second under concurrency; the device interleaves requests instead "
                                 "of serving one at a time); false: one request's forward at a time, so an answer "
                                 "never depends on what else runs (the kernels' sums differ with a decode's width "
                                 "in the last bits).")
    max_queued_requests: int = Field(32, ge=-1, description="Queued requests before 503 (-1 = unbounded).")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)


def _tier(tier: str, **kw: object) -> TierArgs:
    return TierArgs(label_selector={"tier": tier}, **kw)


class KbArgs(StrictModel):
    path: str | None = Field(None, description="Knowledge base file all cloud replicas share "
                             "(default: AIFLOW_KB_PATH, else AIFLOW_HOME/kb/default.sqlite).")
    index: Literal["exact", "hnsw"] = Field("exact", description="exact: full scan, recall 1 (the demo corpora's "
                                            "size); hnsw: approximate, for much larger knowledge bases.")
    chunk_chars: int = Field(1000, ge=100, le=8000, description="Chunk size for documents ingested over HTTP.")
    overlap_chars: int = Field(200, ge=0, le=2000, description="Overlap of consecutive chunks.")
    refresh_interval_s: float = Field(1.0, gt=0, description="How often a replica checks for new ingestions.")
    snapshots_dir: str | None = Field(None, description="Directory of versioned read-only snapshots on a volume all "
                                      "cloud replicas mount (rag/snapshots.py; default: AIFLOW_KB_SNAPSHOTS when "
                                      "set): how several pods share one knowledge base. Unset: the file at path.")
    snapshots_keep: int = Field(3, ge=1, le=1000, description="Versions kept when an ingestion prunes; older ones "
                                "go once superseded for snapshots_grace_s.")
    snapshots_grace_s: float = Field(600.0, ge=0, description="How long a superseded version stays readable for "
                                     "replicas that have not moved on yet.")

    def path_or_default(self) -> Path:
        from aiflow_ray import envs

        return Path(self.path).expanduser() if self.path else envs.kb_path()

    def snapshots_or_default(self) -> Path | None:
        from aiflow_ray import envs

        return Path(self.snapshots_dir).expanduser() if self.snapshots_dir else envs.kb_snapshots_dir()


class LinkProbeArgs(StrictModel):
    enabled: bool = Field(True, description="Probe quiet device links so estimates stay current.")
    interval_s: float = Field(2.0, gt=0, description="Probe a link after this long without traffic.")
    padding_bytes: int = Field(1024, ge=64, le=65536, description="Size of the padded probe of each pair.")
    idle_stop_s: float = Field(300.0, gt=0, description="Stop probing a device with no requests for this long.")


class RouterArgs(StrictModel):
    fast_slo_s_per_token: float = Field(
        0.25, gt=0, description="'fast' requests keep the large model while its predicted latency per output "
        "token (end to end, time to first token included) meets this.",
    )
    shed_to_device: bool = Field(True, description="Saturated edge: answer 'fast' requests on the device.")
    max_draft_len: int = Field(DEFAULT_MAX_DRAFT_LEN, ge=1, le=64, description="Largest k the router may pick.")
    load_report_period_s: float = Field(1.0, gt=0, description="How often replicas push their load.")
    # Priors: used only until the first measurement of each quantity replaces them.
    prior_alpha: float = Field(0.7, gt=0, lt=1, description="Acceptance assumed before any round was seen.")
    prior_draft_s_per_token: float = Field(0.09, gt=0, description="Drafter seconds per token before calibration.")
    prior_verify_s: float = Field(0.23, gt=0, description="Verifier seconds per forward before calibration.")
    prior_bandwidth_bps: float = Field(1e6, gt=0, description="Link bandwidth assumed for a link never measured.")
    prior_rtt_s: float = Field(0.02, ge=0, description="Link RTT assumed for a link never measured.")
    decisions_kept: int = Field(200, ge=1, le=10_000, description="Recent decisions kept for /v1/router.")


class RateLimitArgs(StrictModel):
    """A token bucket per caller: ``burst`` requests at once, refilled at ``requests_per_s``.

    Each ingress replica keeps its own buckets, so a deployment with N ingress replicas lets a caller
    through up to N times as fast as one bucket would.
    """

    requests_per_s: float | None = Field(
        None, gt=0, description="Sustained requests per second of one caller (its key, else its host); "
        "null = no limit.")
    burst: int = Field(20, ge=1, description="Requests one caller may send at once before the rate applies.")
    max_callers: int = Field(10_000, ge=1, le=1_000_000, description="Callers tracked per ingress replica; the "
                             "least recently seen is forgotten beyond it (and starts again with a full bucket).")


class DeadlineArgs(StrictModel):
    """How long each cross-tier call may take. A call past its deadline is abandoned and treated as a failed
    replica (retried elsewhere, or answered 503 + Retry-After): no request waits on a dead node."""

    request_s: float = Field(300.0, gt=0, description="A whole generation, from the ingress's receipt (1024 tokens "
                             "of the 1.5B verifier at its slowest measured 0.25 s/token fit).")
    edge_call_s: float = Field(30.0, gt=0, description="One verify call, or the wait for one streamed token, "
                               "queueing behind other sessions included.")
    cloud_call_s: float = Field(120.0, gt=0, description="One retrieval or grounded beam search.")
    router_call_s: float = Field(2.0, gt=0, description="One routing decision; past it the ingress decides from "
                                 "the router's last saved state.")
    link_outage_s: float = Field(2.0, gt=0, description="A device-edge transfer stalled this long (and four times "
                                 "its expected time) is an outage: requests whose quality allows it finish on "
                                 "the device.")
    max_failovers: int = Field(4, ge=0, le=16, description="Retries of a failed edge or cloud call per request "
                               "on another replica (the device resends its context).")


class AppArgs(StrictModel):
    """Arguments of ``aiflow_ray.serve:build_app``."""

    name: str = Field("aiflow", pattern=r"^[a-z0-9-]{1,40}$", description="Application name (router actor name).")
    model_preset: ModelPreset = Field("default", description="default = Qwen pair; tiny = test models; tiny-vlm = "
                                      "test vision-language models; caption = the trained captioning pair.")
    models: ModelPairConfig | None = Field(None, description="Explicit model pair (overrides the profile).")
    device: TierArgs = Field(default_factory=lambda: _tier("device"))
    edge: TierArgs = Field(default_factory=lambda: _tier("edge"))
    cloud: TierArgs = Field(default_factory=lambda: _tier("cloud"))
    ingress: TierArgs = Field(default_factory=lambda: TierArgs(num_cpus=0.5, max_ongoing_requests=64))
    link: LinkConfig = Field(default_factory=lambda: LinkConfig(bandwidth_bps=1e6, rtt_s=0.02))
    edge_cloud_link: LinkConfig = Field(default_factory=lambda: LinkConfig(bandwidth_bps=10e6, rtt_s=0.04))
    router: RouterArgs = Field(default_factory=RouterArgs)
    link_probe: LinkProbeArgs = Field(default_factory=LinkProbeArgs)
    kb: KbArgs = Field(default_factory=KbArgs)
    deadlines: DeadlineArgs = Field(default_factory=DeadlineArgs)
    max_body_bytes: int = Field(64 << 20, ge=1024, description="Largest request body accepted: camera photos of up "
                                "to ~12 MB travel base64-encoded (4/3 of their size) in JSON.")
    images: ImageLimits = Field(default_factory=ImageLimits, description="Limits on request images, checked on the "
                                "device tier before any pixel is decoded, and again at the edge.")
    rate_limit: RateLimitArgs = Field(default_factory=RateLimitArgs,
                                      description="Per-caller request rate limit of the API (off by default).")
    stream_interval_s: float = Field(
        0.05, ge=0, le=1.0, description="Streams: after the first chunk, tokens ready within this long of the last "
        "chunk go out together (never held longer than this). Each chunk crosses the device replica, the ingress and "
        "the HTTP proxy, about 6 ms of CPU that a 2-core host takes from the decode; 0 sends every round at once.")
    max_new_tokens_limit: int = Field(1024, ge=1, le=4096, description="Cap on max_tokens per request.")
    max_context_tokens: int = Field(
        MAX_CONTEXT_TOKENS, ge=512, le=MAX_CONTEXT_TOKENS, description="Longest prompt + max_tokens a request may "
        "ask for, in tokens (the models' trained context; llama.cpp's KV pool holds it). Lower where a vLLM tier's "
        "max_model_len is shorter.")
    edge_sessions_per_replica: int = Field(64, ge=1, description="Sessions an edge replica keeps (LRU).")
    check_labels: bool = Field(True, description="Refuse to build when no node carries a tier's labels.")
    peer_models: dict[str, str] = Field(default_factory=dict, description="Models that other applications of the "
                                        "same Serve config serve, by route prefix (e.g. the vision pair at "
                                        "/vision): a request for one gets a 404 that says where it is.")

    def model_pair(self) -> ModelPairConfig:
        return self.models or ModelPairConfig.for_preset(self.model_preset)

    def context_limit_tokens(self) -> int:
        """Prompt + max_tokens that every tier on a request's way can hold: a verification scores a draft
        past the last output token, so a vLLM tier gives up a draft's length of its max_model_len."""
        limits = [self.max_context_tokens]
        limits += [t.vllm.max_model_len - MAX_DRAFT_LEN - 1 for t in (self.device, self.edge, self.cloud)
                   if t.engine == "vllm"]
        return min(limits)

    def tier(self, name: str) -> TierArgs:
        """The settings of one deployment: a tier (device, edge, cloud) or the ingress."""
        tier: TierArgs = getattr(self, name)
        return tier
