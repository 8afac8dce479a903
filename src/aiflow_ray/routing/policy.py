"""Path choice (pure): which tiers serve a request, and with which draft length.

Quality levels:
- ``exact``: the large model's output is required: device-edge or server-only.
- ``fast``: the small model's output is acceptable. The large model's output is still preferred
  while its predicted latency per output token meets the objective ``fast_slo_s_per_token``;
  beyond that (slow link, loaded edge) the request takes whichever path is predicted faster,
  usually the device.

Paths are compared by predicted end-to-end latency per output token, (TTFT + (n - 1) TPOT) / n for
the request's n = max_new_tokens, not by TPOT alone: the raw input crosses the link before the
first token on the edge paths (never on-device), and on a slow link that upload, not decoding,
decides which path answers first.
- ``grounded``: retrieval from the cloud is required: device-edge-cloud.
An explicit path is honoured unless the client also set a quality it cannot give (a 400 naming the
field) or its tier is down (a 503). Refusals are values on the decision, never exceptions, so they
cross Ray hops intact and reach the client as one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import cast

from aiflow_ray.config import DEFAULT_MAX_DRAFT_LEN, LOGPROB_PATHS, PathName, Quality
from aiflow_ray.errors import Refusal
from aiflow_ray.network.wire import TOKENS_MESSAGE_SIZE, VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.speculative.cost_model import ComputeCosts, LinkCosts, best_draft_len, round_time_s

Path = PathName


@dataclass(frozen=True)
class TierLoad:
    """A tier's load as its replicas report it, and as the router counts it.

    ``saturated``: every slot is taken, so new work would wait (``fast`` requests go to the device instead).
    ``full``: the tier is also past its bounded queue; only then is a request that needs the tier refused
    (503 with Retry-After). Both count by the replicas' reports or by the router's own count of requests it
    admitted there that have not ended, whichever is higher: reports lag up to a period behind.
    """

    available: bool = True
    ongoing: int = 0
    queued: int = 0
    capacity: int = 8  # requests the tier serves at once (replicas x max ongoing)
    in_flight: int = 0  # requests the router admitted to this tier that have not ended
    queue_limit: int = 0  # requests that may wait for a slot beyond ``capacity``
    # Requests the tier finished per second while every slot was taken (None until measured): its real pace
    # under load, which on a small host is well below what an idle tier's per-request time predicts.
    drain_rps: float | None = None

    @property
    def saturated(self) -> bool:
        return not self.available or self.waiting > 0

    @property
    def waiting(self) -> int:
        """Requests past the tier's capacity: those a new request would queue behind."""
        return max(self.ongoing + self.queued, self.in_flight) - self.capacity + 1

    def full(self, queue_limit: int | None = None) -> bool:
        limit = self.queue_limit if queue_limit is None else queue_limit
        return not self.available or self.waiting > limit

    @property
    def utilisation(self) -> float:
        return (self.ongoing + self.queued) / max(self.capacity, 1)


@dataclass(frozen=True)
class RouteInputs:
    alpha: float
    compute: ComputeCosts
    link: LinkCosts
    edge: TierLoad
    cloud: TierLoad
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN
    fast_slo_s_per_token: float = 0.25
    shed_to_device: bool = True  # False: queue at the edge instead of answering from the device
    prompt_bytes: int = 0  # raw input that crosses the link before the first token (edge paths)
    # Seconds to compute the prompt's first token on an idle tier (its prefill; 0 = not known): TTFT's
    # largest term on a long prompt, which grows with it, where a decode step does not.
    edge_prefill_s: float = 0.0
    device_prefill_s: float = 0.0
    on_device_s_per_token: float = 0.0  # the small model generating alone (0 = not known: the drafting cost)
    max_new_tokens: int = 64
    # The cloud, as the edge: its edge-cloud link, retrieval time and beam-search time per token.
    cloud_link: LinkCosts = field(default_factory=lambda: LinkCosts(0.04, 1e7, 1e7))
    cloud_retrieval_s: float = 0.05
    cloud_s_per_token: float = 0.5
    request_deadline_s: float = 300.0  # a request's whole budget: a queue it would time out in is refused
    # How long the client waits (its own timeout, when it says): past it an answer is lost however complete,
    # so a queue that long refuses the request at once, with a Retry-After, instead.
    client_timeout_s: float | None = None
    client_timeout_first_byte: bool = False  # the timeout bounds the first byte only (a streamed read timeout)
    # Per path, the TPOT its requests measured lately: the pace of a request under the host's present contention.
    measured_tpot_s: dict[str, float] = field(default_factory=dict)
    # The device tier, which runs every path's request from start to end (None until its replicas report):
    # where its emulated devices share a host, it is a tier with slots and a queue like the others.
    device: TierLoad | None = None
    # The device and edge tiers compute on one host's CPUs (the local cluster, a one-pod install). Under an edge
    # queue, speculation looks cheaper than server-only because the devices' drafting is free for the edge; on a
    # shared host it is not: every draft takes CPU from the edge's queue, so the device's costs are stretched
    # with the edge's. On the local profile under 4-16 guidellm streams auto sent 45 of about 140 requests to
    # device-edge without this, 4 of 128 with it (docs/benchmarks/concurrency_default.md).
    shared_host: bool = False


# Admission aims at this share of a client's stated timeout: the queue's pace is an estimate.
CLIENT_TIMEOUT_SHARE = 0.8


@dataclass
class Decision:
    path: Path | None  # None: the request cannot be served now (the caller answers 503)
    draft_len: int
    reason: str
    predicted_tpot_s: dict[str, float] = field(default_factory=dict)
    predicted_ttft_s: dict[str, float] = field(default_factory=dict)
    predicted_s_per_token: dict[str, float] = field(default_factory=dict)  # (TTFT + (n-1) TPOT) / n
    refusal: Refusal | None = None  # set exactly when path is None
    request_id: str = ""  # the request's id, which its measured outcome is reported under


def _edge_factor(load: TierLoad) -> float:
    # Queueing inflates service time; an M/M/1-style 1/(1-rho) keeps it simple and monotone.
    rho = min(load.utilisation, 0.95)
    return 1.0 / (1.0 - rho)


@dataclass(frozen=True)
class Prediction:
    draft_len: int
    tpot_s: dict[str, float]
    ttft_s: dict[str, float]
    s_per_token: dict[str, float]


def predict(inputs: RouteInputs) -> Prediction:
    compute = inputs.compute
    link = inputs.link
    factor = _edge_factor(inputs.edge)
    loaded = compute.scaled(factor, device_too=inputs.shared_host)
    k, spec = best_draft_len(inputs.alpha, loaded, link, verify_request_size, VERIFY_RESULT_SIZE,
                             inputs.max_draft_len)
    # Server-only streams one TOKENS message per token: on a very slow link their serialisation,
    # not the verifier, sets the pace.
    streamed = TOKENS_MESSAGE_SIZE / link.bandwidth_down_bps
    upload = link.rtt_s + inputs.prompt_bytes / link.bandwidth_up_bps
    on_device_s = inputs.on_device_s_per_token or compute.draft_s_per_token
    loaded_on_device_s = on_device_s * (factor if inputs.shared_host else 1.0)
    tpot = {
        "on-device": loaded_on_device_s,  # stretched only on a shared host
        "device-edge": spec,
        "server-only": max(loaded.verify_s(0), streamed),
    }
    # The prompt's prefill, beyond the one-token forward each path pays for its first token anyway: on the
    # device it comes before the first draft, at the edge it rides the first verify (or is the first step).
    device_prefill = max(inputs.device_prefill_s - on_device_s, 0.0) * (
        factor if inputs.shared_host else 1.0)
    edge_prefill = max(inputs.edge_prefill_s - compute.verify_s(0), 0.0) * factor
    ttft = {
        "on-device": loaded_on_device_s + device_prefill,
        # Token ids (4 bytes each) replace the text, about as many bytes as the raw prompt.
        "device-edge": upload + device_prefill + edge_prefill
        + round_time_s(k, loaded, link, verify_request_size, VERIFY_RESULT_SIZE),
        "server-only": upload + loaded.verify_s(0) + edge_prefill + streamed,
    }
    n = max(inputs.max_new_tokens, 1)
    cloud_factor = _edge_factor(inputs.cloud)
    # Beam search answers all at once: every token arrives with the last, so it is all TTFT.
    cloud = inputs.cloud_link
    ttft["device-edge-cloud"] = (upload + cloud.rtt_s + inputs.prompt_bytes / cloud.bandwidth_up_bps
                                 + cloud_factor * (inputs.cloud_retrieval_s + n * inputs.cloud_s_per_token))
    tpot["device-edge-cloud"] = 0.0
    per_token = {p: (ttft[p] + (n - 1) * tpot[p]) / n for p in tpot}
    return Prediction(k, tpot, ttft, per_token)


def _queue_bound(inputs: RouteInputs, load: TierLoad, path: Path) -> tuple[float, int, float]:
    """(seconds one request holds a slot, the tier's queue bound, the budget the bound is sized for).

    A slot's time is the longest of: the idle prediction; the idle TTFT plus the path's recently measured
    TPOT per token (from the first completions on); capacity / the rate the saturated tier drained at. The
    last two measure the host's present contention. A request queued behind W others ends after about
    (W / capacity + 1) slot times; the bound is the configured one, cut to the W whose requests still end
    within the budget: the request deadline, or the client's own timeout when it states one (for a streamed
    read timeout, the first token must come within it). A request queued past that would time out waiting,
    so it is refused now, with a Retry-After it can use."""
    idle = predict(replace(inputs, edge=TierLoad(capacity=inputs.edge.capacity),
                           cloud=TierLoad(capacity=inputs.cloud.capacity)))
    n = max(inputs.max_new_tokens, 1)
    idle_s = max(idle.s_per_token[path] * n, 1e-3)
    request_s = max(idle_s, idle.ttft_s[path] + (n - 1) * inputs.measured_tpot_s.get(path, 0.0))
    if load.drain_rps:
        request_s = max(request_s, load.capacity / load.drain_rps)
    budget_s, own_s = inputs.request_deadline_s, request_s
    if inputs.client_timeout_s is not None:
        budget_s = min(budget_s, inputs.client_timeout_s * CLIENT_TIMEOUT_SHARE)
        if inputs.client_timeout_first_byte:
            own_s = min(request_s, idle.ttft_s[path] * request_s / idle_s)
    workable = int(load.capacity * (budget_s - own_s) / request_s)
    if not load.drain_rps:
        # Not yet measured saturated: the paces above come from lighter load, and on a host whose cores the
        # requests share they are too short by up to the concurrency (a step load on one core otherwise queued
        # requests past their client's timeout before any measurement could say so). Until the first
        # saturated completions measure the real pace, size the queue for the worst case, the slots' requests
        # running one after another, but keep at least one waiting request per slot: a tier that batches (or
        # has the cores) would otherwise refuse at capacity while a generous deadline had room to spare.
        serial_s = request_s * load.capacity
        workable = min(workable, max(load.capacity, int(load.capacity * (budget_s - serial_s) / serial_s)))
    return request_s, max(min(load.queue_limit, workable), 0), budget_s


def _admission(inputs: RouteInputs, tier: str, load: TierLoad, path: Path) -> tuple[str, Refusal | None]:
    """A request for ``path`` at a tier: ('', None) with a slot free; (how deep it queues, None) within the
    bounded queue; (why, a 503 with Retry-After) past it."""
    if not load.saturated:
        return "", None
    request_s, limit, budget_s = _queue_bound(inputs, load, path)
    if not load.full(limit):
        return f"{tier} busy, queued behind {max(load.waiting, 0)} of at most {limit}", None
    retry_s = int(min(max(request_s * load.waiting / max(load.capacity, 1), 1.0), 60.0) + 0.999)
    message = (f"{tier} full: {max(load.waiting, 0) + load.capacity - 1} requests for {load.capacity} slots and a "
               f"queue of {limit} (sized for a {budget_s:.0f} s deadline at {request_s:.1f} s a request)")
    return message, Refusal(503, f"no tier can serve this request now: {message}", None, retry_s)


# Which answers each path can give: a path contradicts a quality it cannot satisfy.
_PATH_QUALITIES: dict[str, tuple[Quality, ...]] = {
    "on-device": ("fast",),
    "device-edge": ("exact", "fast"),
    "server-only": ("exact", "fast"),
    "device-edge-cloud": ("grounded",),
}
_QUALITY_MEANS = {"exact": "the large model's answer to the prompt", "fast": "the small or large model's answer "
                  "to the prompt", "grounded": "an answer from the knowledge base"}


def decide(requested: str, quality: Quality | None, inputs: RouteInputs, fixed_draft_len: int | None = None,
           needs_logprobs: bool = False) -> Decision:
    """The path and draft length for one request, or a refusal (never an exception).

    ``quality`` None means the client did not say: a forced path just runs, ``auto`` means 'exact'.
    A refusal is a 400 when the request contradicts itself and a 503 with Retry-After when the tier it
    needs is down, or full: every slot taken and its bounded queue too. A busy tier queues requests that
    need it (``fast`` ones go to the device instead while ``shed_to_device``).
    """
    pred = predict(inputs)
    k = fixed_draft_len if fixed_draft_len is not None else pred.draft_len
    lat = pred.s_per_token

    def made(path: Path | None, draft_len: int, reason: str, refusal: Refusal | None = None) -> Decision:
        if path is None and refusal is None:
            refusal = Refusal(503, f"no tier can serve this request now: {reason}", None, 1)
        if path is not None and inputs.device is not None:
            note, refused = _admission(inputs, "device", inputs.device, path)
            if refused is not None:
                return Decision(None, draft_len, note, pred.tpot_s, pred.ttft_s, lat, refused)
            reason = f"{reason}; {note}" if note else reason
        return Decision(path, draft_len, reason, pred.tpot_s, pred.ttft_s, lat, refusal)

    def bad(field: str, message: str) -> Decision:
        return made(None, k, message, Refusal(400, message, field))

    def admit(path: Path, tier: str, reason: str) -> Decision:
        """``path`` if its tier has a free slot or room in its bounded queue, else a 503 with Retry-After."""
        load = inputs.edge if tier == "edge" else inputs.cloud
        if not load.available:
            return made(None, k, f"{tier} tier unavailable")
        note, refused = _admission(inputs, tier, load, path)
        if refused is not None:
            return made(None, k, note, refused)
        return made(path, k, f"{reason}; {note}" if note else reason)

    if requested != "auto" and quality is not None and quality not in _PATH_QUALITIES[requested]:
        return bad("quality", f"path '{requested}' cannot give quality '{quality}' ({_QUALITY_MEANS[quality]})")
    if needs_logprobs and (requested not in ("auto", *LOGPROB_PATHS) or quality == "grounded"):
        return bad("logprobs", "logprobs need the verifier's distribution, which only paths "
                   f"{' and '.join(LOGPROB_PATHS)} have")
    edge_ok = inputs.edge.available and not inputs.edge.saturated
    if quality == "grounded" or requested == "device-edge-cloud":
        return admit("device-edge-cloud", "cloud", "grounded answers need the cloud knowledge base (predicted "
                     f"{lat['device-edge-cloud'] * 1e3:.1f} ms per token)")
    if requested == "on-device":
        return made("on-device", 0, "requested on-device")
    # With logprobs, a 'fast' request still needs the large model: the device cannot stand in for it.
    may_shed = quality != "exact" and inputs.shed_to_device and not needs_logprobs
    if requested in ("device-edge", "server-only"):
        if not edge_ok and quality == "fast" and may_shed:
            return made("on-device", 0, f"edge {'saturated' if inputs.edge.available else 'unreachable'}: "
                        "falling back to on-device")
        return admit(cast(Path, requested), "edge", f"requested {requested}")
    # auto
    large_path: Path = "device-edge" if lat["device-edge"] <= lat["server-only"] else "server-only"
    # (auto never picks the cloud for exact or fast requests: it answers another question, slower.)
    large_ms = lat[large_path] * 1e3
    if quality != "fast" or needs_logprobs:
        # Exact answers need the large model: a busy edge queues them (bounded), as a serving engine does.
        return admit(large_path, "edge", f"{large_path} has the lowest predicted latency ({large_ms:.1f} ms per "
                     "token)")
    if not edge_ok:
        state = "saturated" if inputs.edge.available else "unreachable"
        if may_shed or not inputs.edge.available:
            return made("on-device", 0, f"edge {state}: on-device")
        return admit(large_path, "edge", f"edge {state}: queueing for the large model")
    slo_ms = inputs.fast_slo_s_per_token * 1e3
    if lat[large_path] <= inputs.fast_slo_s_per_token:
        return made(large_path, k, f"{large_path} predicted {large_ms:.1f} ms per token (TTFT included) meets "
                    f"the {slo_ms:g} ms objective")
    if lat["on-device"] < lat[large_path]:
        return made("on-device", 0, f"{large_path} predicted {large_ms:.1f} ms per token misses the {slo_ms:g} ms "
                    f"objective; on-device is faster ({lat['on-device'] * 1e3:.1f} ms)")
    return made(large_path, k, f"{large_path} predicted {large_ms:.1f} ms per token, the fastest path though "
                "over the objective")
