"""Generated deployment files: Serve configs in deployments/ and KubeRay manifests in k8s/ (serve/kube.py).

Both come from ``AppArgs`` profiles here, so the YAML and the RayService's ``serveConfigV2`` carry the
same import path and args and cannot drift. ``aiflow configs render`` rewrites them; a test checks
that the committed files equal the rendered ones.
"""

from __future__ import annotations

from typing import Any

import yaml

from aiflow_ray.config.app import AppArgs

IMPORT_PATH = "aiflow_ray.serve:build_app"
PROFILES = ("local", "tiny", "gpu", "dev")
RAY_VERSION = "2.60.0"
# The vision-language pair is a second Serve application beside the text one, under its own route prefix:
# its own tiers, router and link estimates (an image prompt's costs are not a text prompt's), deployed and
# scaled with the text pair by one config. OpenAI clients reach it with base_url <host>/vision/v1.
VISION_APP = "aiflow-vision"
VISION_PREFIX = "/vision"
VISION_PRESETS = {"local": "caption", "tiny": "tiny-vlm", "dev": "caption"}


def profile_args(profile: str) -> dict[str, Any]:
    # What each tier scales on, as Serve's request count per replica (see AutoscalingArgs): the edge and the
    # cloud run one forward at a time, so a mean above 1 is a queue of verifications or beam searches (a llama.cpp
    # edge shares its decodes among the requests it holds: there a mean above 1 is partly shared work, and it
    # still scales at 1; not re-tuned for it). A device
    # replica holds each generation it runs from start to end, waits on the edge included, so its count rises
    # with any tier's queue: it scales when 3 of its 4 slots are taken, before requests queue in front of it,
    # not on the edge's delays (at 2 it went up and down every 15-20 s under a steady load). The ingress only
    # awaits the tiers and needs a second replica only when its 64 slots fill.
    target = {"device": 3, "edge": 1, "cloud": 1}
    ingress = {"num_cpus": 0.5, "max_ongoing_requests": 64, "autoscaling": {"target_ongoing_requests": 32}}
    # Tiny replicas start in 4-8 s (docs/benchmarks/load.md): scale up on a queue that outlasts a start-up,
    # down only after several start-ups' worth of quiet (at 10 s the tiers flapped under a steady load).
    tiny_scaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 5, "downscale_delay_s": 30,
                    "look_back_period_s": 5}
    # The ingress (and the router, which goes where it goes) on the head, with the HTTP proxy: a tier's node
    # failing must not take the replica that answers the client with it (the proxy then answers a bare 500).
    on_head = {"label_selector": {"tier": "head"}}
    if profile == "local":
        # CPU nodes: every tier runs llama.cpp on the GGUF files as released: 2.6-3.4x faster per token than
        # the HF engine in bf16 and faster at every verify length up to 8 (docs/benchmarks/engines.md), the
        # fastest served system here (served.md), and beam search 3x faster than transformers' (beam.md).
        # `--set edge.engine=hf` gives the exact reference verifier.
        raw: dict[str, Any] = {tier: {"label_selector": {"tier": tier}, "engine": "llama_cpp",
                                      "autoscaling": {"target_ongoing_requests": target[tier]}}
                               for tier in ("device", "edge", "cloud")}
        raw["ingress"] = {**ingress, **on_head}
    elif profile == "dev":
        # One machine, no tier labels (`ray start --head` on a laptop, or the k8s dev overlay's single pod):
        # the tiers of the local profile, one replica each, wherever the node has room.
        raw = {tier: {"label_selector": {}, "engine": "llama_cpp", "threads": 2,
                      "autoscaling": {"min_replicas": 1, "max_replicas": 1}} for tier in ("device", "edge", "cloud")}
        raw["ingress"] = {"num_cpus": 0.5, "max_ongoing_requests": 64}
        raw["check_labels"] = False
    elif profile == "tiny":
        raw = {
            "model_preset": "tiny",
            **{tier: {"label_selector": {"tier": tier},
                      "autoscaling": {**tiny_scaling, "target_ongoing_requests": target[tier]}}
               for tier in ("device", "edge", "cloud")},
            "ingress": {**ingress, **on_head},
            "link": {"bandwidth_bps": 2e6, "rtt_s": 0.002},
            # Tiny models decode in about a millisecond: an objective at that scale lets the link
            # decide between the large model and the device, as it would for real models at ~100 ms.
            "router": {"fast_slo_s_per_token": 0.005},
        }
    elif profile == "gpu":
        # Every tier on vLLM with one GPU per replica: CUDA graphs remove the launch overhead that makes eager
        # torch draft at 0.86 of the verifier's cost (docs/design.md section 7), and continuous batching puts
        # the verifies of all devices on an edge replica into shared engine steps, so an edge replica admits
        # many more requests than a one-forward-at-a-time engine (max_ongoing_requests 64).
        gpu = {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "H100", "engine": "vllm"}
        vllm = {"max_model_len": 8192, "gpu_memory_utilization": 0.85, "max_num_seqs": 128}
        scale = {"min_replicas": 1, "max_replicas": 4}
        raw = {
            "models": {"drafter": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                       "verifier": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "dtype": "bfloat16", "device": "cuda"},
            "device": {"label_selector": {"tier": "device"}, **gpu, "max_ongoing_requests": 16,
                       "vllm": {**vllm, "max_num_seqs": 32},
                       "autoscaling": {**scale, "target_ongoing_requests": target["device"]}},
            "edge": {"label_selector": {"tier": "edge"}, **gpu, "max_ongoing_requests": 64, "vllm": vllm,
                     "autoscaling": {**scale, "target_ongoing_requests": 32}},
            "cloud": {"label_selector": {"tier": "cloud"}, **gpu, "max_ongoing_requests": 16, "vllm": vllm,
                      "autoscaling": {**scale, "max_replicas": 2, "target_ongoing_requests": 8}},
            "ingress": ingress,
        }
    else:
        raise ValueError(f"unknown profile {profile!r}: {', '.join(PROFILES)}")
    return AppArgs.model_validate(raw).model_dump(mode="json", exclude_defaults=True)


def vision_args(profile: str) -> dict[str, Any] | None:
    """The vision application of a profile (None where the profile serves text only: on GPU clusters the
    released InternVL checkpoints are named with ``models``, see README "Images")."""
    preset = VISION_PRESETS.get(profile)
    if preset is None:
        return None
    text = AppArgs.model_validate(profile_args(profile))
    # One replica per tier on one thread: the pair is small (the captioning verifier decodes a token in about
    # 2.4 ms on one core) and every replica's threads on a 2-core host take from the text pair's decode. HF
    # engine, fp32: the exact reference, and the engine whose vision path loads these classes. No logical CPU
    # reserved: a tier node has 2, which the text tier's two replicas take when it scales up under load.
    one = {"min_replicas": 1, "max_replicas": 1}
    raw: dict[str, Any] = {
        "name": VISION_APP,
        "model_preset": preset,
        **{tier: {"label_selector": dict(text.tier(tier).label_selector), "engine": "hf", "threads": 1,
                  "num_cpus": 0, "autoscaling": one}
           for tier in ("device", "edge", "cloud")},
        "ingress": {"label_selector": dict(text.ingress.label_selector), "num_cpus": 0.25,
                    "max_ongoing_requests": 64, "autoscaling": one},
        "link": text.link.model_dump(mode="json"),
        "router": text.router.model_dump(mode="json", exclude_defaults=True),
        "check_labels": text.check_labels,
    }
    return AppArgs.model_validate(raw).model_dump(mode="json", exclude_defaults=True)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["edge.engine=hf", "router.max_draft_len=8"]`` -> nested dict; values are YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. edge.engine=hf)")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def serve_config(profile: str, http_port: int = 8000, overrides: dict[str, Any] | None = None,
                 vision: bool = True) -> dict[str, Any]:
    """The Serve config of a profile; ``overrides`` (nested, as ``parse_overrides`` makes) are validated with
    the profile's arguments, so a misspelt key fails here, naming it, and not in a replica. Overrides under
    ``vision.`` go to the vision application; ``vision=False`` leaves it out."""
    overrides = dict(overrides or {})
    vision_overrides = overrides.pop("vision", None) or {}
    if not isinstance(vision_overrides, dict):
        raise ValueError("override 'vision' takes nested keys (e.g. vision.edge.threads=1); "
                         "`aiflow deploy --no-vision` leaves the vision application out")
    args = profile_args(profile)
    if overrides:
        args = AppArgs.model_validate(_merge(args, overrides)).model_dump(mode="json", exclude_defaults=True)
    apps = [{"name": "aiflow", "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]
    extra = vision_args(profile) if vision else None
    if extra is not None:
        if vision_overrides:
            extra = AppArgs.model_validate(_merge(extra, vision_overrides)).model_dump(mode="json",
                                                                                        exclude_defaults=True)
        pair = AppArgs.model_validate(extra).model_pair()
        # A client that asks the text application for a vision model learns where it is served.
        args["peer_models"] = {pair.verifier: VISION_PREFIX, pair.drafter: VISION_PREFIX}
        apps.append({"name": VISION_APP, "route_prefix": VISION_PREFIX, "import_path": IMPORT_PATH, "args": extra})
    elif vision_overrides:
        raise ValueError(f"profile {profile!r} serves no vision application: drop the vision.* overrides")
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0" if profile == "gpu" else "127.0.0.1", "port": http_port},
        "applications": apps,
    }
