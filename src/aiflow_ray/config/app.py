"""The serving application's arguments: one pydantic model for Python, YAML and RayService alike."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from aiflow_ray.config.generation import (
    DEFAULT_MAX_DRAFT_LEN,
    EngineName,
    LinkConfig,
    ModelPairConfig,
    ModelPreset,
    StrictModel,
)


class AutoscalingArgs(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(2.0, ge=0, description="Load must persist this long before scaling up.")
    downscale_delay_s: float = Field(8.0, ge=0, description="Idleness must persist this long before scaling down.")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class TierArgs(StrictModel):
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels a replica must run on, e.g. {tier: edge}."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (GPU clusters).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100.")
    engine: EngineName = Field("hf", description="Runtime of the tier's model: hf (torch/transformers, the exact "
                               "reference) or llama_cpp (the quantized GGUF as released).")
    threads: int | None = Field(
        None, ge=1, description="Compute threads of the tier's engine, torch or llama.cpp (default: all cores of "
        "the node; Ray would "
        "otherwise cap them at num_cpus, and the tiers of one request take turns rather than compete).")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica serves at once.")
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

    def path_or_default(self) -> Path:
        from aiflow_ray import envs

        return Path(self.path).expanduser() if self.path else envs.kb_path()


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


class AppArgs(StrictModel):
    """Arguments of ``aiflow_ray.serve:build_app``."""

    name: str = Field("aiflow", pattern=r"^[a-z0-9-]{1,40}$", description="Application name (router actor name).")
    model_preset: ModelPreset = Field("default", description="default = Qwen pair; tiny = test models.")
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
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    max_new_tokens_limit: int = Field(1024, ge=1, le=4096, description="Cap on max_tokens per request.")
    edge_sessions_per_replica: int = Field(64, ge=1, description="Sessions an edge replica keeps (LRU).")
    check_labels: bool = Field(True, description="Refuse to build when no node carries a tier's labels.")

    def model_pair(self) -> ModelPairConfig:
        return self.models or ModelPairConfig.for_preset(self.model_preset)

    def tier(self, name: str) -> TierArgs:
        """The settings of one deployment: a tier (device, edge, cloud) or the ingress."""
        tier: TierArgs = getattr(self, name)
        return tier
