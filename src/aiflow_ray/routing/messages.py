"""What the router takes and gives, typed: the tiers' reports, one request as it sees it, and a decision
with the link conditions the device emulates for it. Validated where they arrive (pydantic, extra fields
refused), so nothing crosses a Ray hop as an untyped dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from aiflow_ray.config import MAX_DRAFT_LEN, LinkConfig, PathChoice, Quality, StrictModel, TierName
from aiflow_ray.routing.policy import Decision

Sample = tuple[int, float]  # (bytes, seconds)
Outage = tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]]  # (bytes, seconds waited in vain)


class GenerationReport(StrictModel):
    """What a drafter replica learned from one request (sums over its rounds), or from a probe."""

    link_id: str = Field(..., description="The device's link; empty for reports that measured no link.")
    path: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    draft_s: float = 0.0
    draft_tokens: int = 0
    link_samples: tuple[Sample, ...] = ()  # (bytes, link seconds) per round
    probe_pairs: tuple[tuple[Sample, Sample], ...] = ()
    link_outages: tuple[Outage, ...] = ()  # payloads that missed their deadline on the link
    cloud_link_samples: tuple[Sample, ...] = ()  # edge-cloud (bytes, seconds)
    on_device_s_per_token: float | None = None
    # (prompt tokens, seconds to the first token) of local generations: the device's prefill cost.
    prefill_samples: tuple[tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(ge=0)]], ...] = ()


class LoadReport(StrictModel):
    """A replica's load, pushed every ``load_report_period_s``, with its recent (tokens fed, seconds)."""

    tier: TierName
    replica: str
    ongoing: int = Field(..., ge=0, description="Requests being computed now.")
    queued: int = Field(..., ge=0, description="Requests admitted to the replica and waiting for its engine.")
    capacity: int = Field(..., ge=0, description="Requests the replica admits at once.")
    service_samples: tuple[tuple[int, float], ...] = ()
    # (tokens fed, seconds) of a calibration on the idle replica: they replace what the router held at those
    # sizes (a start-up calibration timed under the other tiers' loading would otherwise linger).
    calibration_samples: tuple[tuple[int, float], ...] = ()
    node_id: str = Field("", description="The Ray node the replica runs on: reports from a dead node's orphaned "
                         "workers are ignored.")


class RouteRequest(StrictModel):
    """One request as the router sees it: keywords, typed, validated at the router."""

    request_id: str
    link_id: str
    path: PathChoice = "auto"
    quality: Quality | None = None
    draft_len: int | None = Field(None, ge=1, le=MAX_DRAFT_LEN, description="A fixed k the client asked for.")
    prompt_bytes: int = Field(0, ge=0, description="Raw input that crosses the link before the first token "
                              "(the text; images are in image_bytes).")
    image_bytes: tuple[int, ...] = Field((), description="Each image's size as the client sent it.")
    max_new_tokens: int = Field(64, ge=1)
    needs_logprobs: bool = False
    request_class: str = Field("", max_length=64, description="What the ingress knows of the request before it "
                               "runs (routing/classes.py): acceptance is learned per class.")
    client_timeout_s: float | None = Field(None, gt=0, description="How long the client waits for its answer, "
                                           "when it says (a header): a queue longer than that refuses at once.")
    client_timeout_first_byte: bool = Field(False, description="client_timeout_s bounds the first byte only "
                                            "(a streamed response under a read timeout).")


@dataclass(frozen=True)
class Routed:
    """The decision, and the link conditions the device emulates for this request (emulation only:
    the decision never reads them)."""

    decision: Decision
    link: LinkConfig
