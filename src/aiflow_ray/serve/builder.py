"""One builder for every way of deploying: Python, ``serve run``/``serve deploy`` YAML, RayService.

Graph (each box a Serve deployment; tiers placed by Ray node labels, GPUs by num_gpus):

    HTTP ──► Ingress (FastAPI) ──► Router (1 replica: estimates, decisions, emulated-link settings)
                │
                ├──► DeviceDrafter  [tier=device]  small model, speculative loop, device link
                │        └──► EdgeVerifier [tier=edge]  large model, session KV (affinity by session)
                └──► CloudService   [tier=cloud]   large model, beam search (retrieval: RAG tier)
"""

from __future__ import annotations

from typing import Any

from aiflow_ray.config import TIERS, AppArgs, TierArgs
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)


# Every round of a session reaches the edge replica holding its KV cache (see serve/affinity.py).
SESSION_ROUTER = "aiflow_ray.serve.affinity:SessionAffinityRouter"


class PlacementError(ValueError):
    """A tier's label selector matches no node of the running cluster."""


def deployment_options(tier: TierArgs, name: str) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": tier.num_cpus}
    if tier.num_gpus:
        actor["num_gpus"] = tier.num_gpus
    if tier.accelerator_type:
        actor["accelerator_type"] = tier.accelerator_type
    if tier.label_selector:
        actor["label_selector"] = dict(tier.label_selector)
    auto = tier.autoscaling
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": tier.max_ongoing_requests,
        "max_queued_requests": tier.max_queued_requests,
        # Past max_queued_requests Serve refuses a request itself (for the ingress, in the proxy): with a
        # Retry-After, like every other refusal of this API, and not Serve's bare 503.
        "backpressure_config": {"status_code": 503, "retry_after_s": 1.0},
        "health_check_period_s": 10.0,  # Serve's default; every check costs CPU on every replica
        # Scale-down must not cut a generation short: a stopping replica gets no new requests and is killed
        # only after its last one ends or the timeout passes. The first wait lets every handle learn that the
        # replica is stopping (Serve's 2 s); later checks come as often.
        "graceful_shutdown_timeout_s": auto.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 2.0,
        # Serve's built-in metric, not a custom one (record_autoscaling_stats + a policy_function): on the
        # edge it already is the verify queue plus the verification running (see AutoscalingArgs), and on the
        # device the generations it holds, and it comes from the handles every metrics_interval_s, where
        # replica-side custom stats would add a second reporting path and a policy to keep in step with it.
        "autoscaling_config": {
            "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
            "initial_replicas": max(auto.min_replicas, 1),
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s,
            "look_back_period_s": auto.look_back_period_s, "metrics_interval_s": auto.metrics_interval_s,
        },
    }


def check_placement(args: AppArgs) -> None:
    """Fail fast: a selector no node satisfies would leave the app DEPLOYING without a message."""
    import ray

    if not args.check_labels or not ray.is_initialized():
        return
    labels = [node.get("Labels", {}) or {} for node in ray.nodes() if node.get("Alive")]
    for tier_name in (*TIERS, "ingress"):
        selector = args.tier(tier_name).label_selector
        if selector and not any(all(lab.get(k) == v for k, v in selector.items()) for lab in labels):
            seen = sorted({f"{k}={v}" for lab in labels for k, v in lab.items() if not k.startswith("ray.io/")})
            raise PlacementError(
                f"tier {tier_name!r} needs a node labelled {selector}, but the cluster's nodes carry "
                f"{seen or 'no custom labels'}; start nodes with `ray start --labels tier={tier_name}` "
                "or change the tier's label_selector"
            )


def build_app(args: dict[str, Any]) -> Any:
    """Validate ``args`` (see ``AppArgs``) and bind the application graph."""
    from ray import serve

    from aiflow_ray.api.app import make_ingress
    from aiflow_ray.serve.cloud_server import CloudServer
    from aiflow_ray.serve.device_server import DeviceDrafterServer
    from aiflow_ray.serve.edge_server import EdgeVerifierServer
    from aiflow_ray.serve.router_server import RouterServer

    parsed = AppArgs.model_validate(args)
    check_placement(parsed)
    raw = parsed.model_dump(mode="json")
    # The router goes where the ingress goes (its only hot caller), off the tiers' nodes.
    router_actor: dict[str, Any] = {"num_cpus": 0}
    if parsed.ingress.label_selector:
        router_actor["label_selector"] = dict(parsed.ingress.label_selector)
    router = serve.deployment(name="Router", num_replicas=1, ray_actor_options=router_actor,
                              max_ongoing_requests=1000)(RouterServer).bind(raw)
    edge_options = deployment_options(parsed.edge, "EdgeVerifier")
    edge_options["request_router_config"] = {"request_router_class": SESSION_ROUTER}
    edge = serve.deployment(**edge_options)(EdgeVerifierServer).bind(raw)
    cloud = serve.deployment(**deployment_options(parsed.cloud, "CloudService"))(CloudServer).bind(raw)
    device = serve.deployment(**deployment_options(parsed.device, "DeviceDrafter"))(DeviceDrafterServer).bind(
        raw, edge, cloud
    )
    ingress_cls = make_ingress()
    return serve.deployment(**deployment_options(parsed.ingress, "Ingress"))(ingress_cls).bind(
        raw, device, cloud, router
    )
