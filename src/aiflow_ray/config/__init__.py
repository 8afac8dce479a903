"""Pydantic models for every setting (``extra="forbid"`` everywhere) and the project's vocabulary.

``generation``: one request and its parts (sampling, link, draft length, model pair); ``app``: the
serving application's arguments, shared by Python, Serve YAML and the RayService.
"""

from aiflow_ray.config.app import (
    AppArgs,
    AutoscalingArgs,
    KbArgs,
    LinkProbeArgs,
    RouterArgs,
    TierArgs,
    VllmArgs,
)
from aiflow_ray.config.generation import (
    DEFAULT_MAX_DRAFT_LEN,
    LOGPROB_PATHS,
    MAX_CONTEXT_TOKENS,
    MAX_DRAFT_LEN,
    MAX_NEW_TOKENS,
    PATHS,
    TIERS,
    ChatTurn,
    DraftPolicyConfig,
    EngineName,
    GenerateOptions,
    GroundingOptions,
    LinkConfig,
    ModelPairConfig,
    ModelPreset,
    PathChoice,
    PathName,
    Quality,
    SamplingConfig,
    StrictModel,
    TierName,
    TraceStep,
)

__all__ = [
    "DEFAULT_MAX_DRAFT_LEN", "LOGPROB_PATHS", "MAX_CONTEXT_TOKENS", "MAX_DRAFT_LEN", "MAX_NEW_TOKENS", "PATHS",
    "TIERS", "AppArgs",
    "AutoscalingArgs", "ChatTurn", "DraftPolicyConfig", "EngineName", "GenerateOptions", "GroundingOptions", "KbArgs",
    "LinkConfig", "LinkProbeArgs", "ModelPairConfig", "ModelPreset", "PathChoice", "PathName", "Quality",
    "RouterArgs", "SamplingConfig", "StrictModel", "TierArgs", "TierName", "TraceStep", "VllmArgs",
]
