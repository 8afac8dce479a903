"""The committed deployment files are exactly what the builder's profiles render, and valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aiflow_ray.config.app import AppArgs
from aiflow_ray.models.registry import model_modalities
from aiflow_ray.serve.configs import IMPORT_PATH
from aiflow_ray.serve.render import rendered_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(rendered_files()))
def test_committed_files_match_the_rendered_ones(rel: str) -> None:
    assert (ROOT / rel).read_text() == rendered_files()[rel], f"run `make configs` to regenerate {rel}"


@pytest.mark.parametrize("rel", ["deployments/local.yaml", "deployments/tiny.yaml", "deployments/gpu.yaml",
                                 "deployments/dev.yaml"])
def test_serve_configs_reach_the_one_builder_with_valid_args(rel: str) -> None:
    config = yaml.safe_load((ROOT / rel).read_text())
    apps = config["applications"]
    for app in apps:
        assert app["import_path"] == IMPORT_PATH
        AppArgs.model_validate(app["args"])
    # Distinct names (each app's router actor is named after it) and prefixes; the text app at the root.
    assert len({a["name"] for a in apps}) == len({a["args"].get("name", "aiflow") for a in apps}) == len(apps)
    assert apps[0]["route_prefix"] == "/" and len({a["route_prefix"] for a in apps}) == len(apps)
    if "gpu" not in rel:
        assert config["http_options"]["host"] == "127.0.0.1"
        # Beside the text pair, a vision pair: the text app's 404 for its models names the prefix.
        (vision,) = apps[1:]
        pair = AppArgs.model_validate(vision["args"]).model_pair()
        assert "image" in model_modalities(pair.verifier) and "image" in model_modalities(pair.drafter)
        assert apps[0]["args"]["peer_models"] == {pair.verifier: vision["route_prefix"],
                                                  pair.drafter: vision["route_prefix"]}
    else:
        assert len(apps) == 1


def test_app_args_reject_unknown_fields_and_bad_autoscaling() -> None:
    with pytest.raises(ValueError, match="edgee"):
        AppArgs.model_validate({"edgee": {}})
    with pytest.raises(ValueError, match="min_replicas"):
        AppArgs.model_validate({"edge": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}})


def test_deploy_overrides_change_one_argument_and_refuse_misspelt_ones() -> None:
    from pydantic import ValidationError

    from aiflow_ray.serve.configs import parse_overrides, serve_config

    overrides = parse_overrides(["edge.engine=hf", "router.max_draft_len=8"])
    assert overrides == {"edge": {"engine": "hf"}, "router": {"max_draft_len": 8}}
    args = AppArgs.model_validate(serve_config("local", overrides=overrides)["applications"][0]["args"])
    assert (args.edge.engine, args.device.engine, args.router.max_draft_len) == ("hf", "llama_cpp", 8)
    assert args.edge.label_selector == {"tier": "edge"}  # the rest of the profile's tier stays
    with pytest.raises(ValidationError, match="engnie"):
        serve_config("local", overrides=parse_overrides(["edge.engnie=hf"]))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["edge.engine"])
    # vision.* keys go to the vision application, and only there; --no-vision leaves it out.
    config = serve_config("tiny", overrides=parse_overrides(["vision.edge.threads=2", "edge.threads=1"]))
    text, vision = (AppArgs.model_validate(app["args"]) for app in config["applications"])
    assert (text.edge.threads, vision.edge.threads, vision.model_preset) == (1, 2, "tiny-vlm")
    with pytest.raises(ValidationError, match="thread"):
        serve_config("tiny", overrides=parse_overrides(["vision.edge.thread=2"]))
    assert [a["name"] for a in serve_config("tiny", vision=False)["applications"]] == ["aiflow"]
    assert "peer_models" not in serve_config("tiny", vision=False)["applications"][0]["args"]
    with pytest.raises(ValueError, match="no vision application"):
        serve_config("gpu", overrides={"vision": {"edge": {"threads": 1}}})


@pytest.mark.parametrize("profile", ["local", "tiny", "gpu", "dev"])
def test_scale_down_never_cuts_a_request_short_of_its_deadline(profile: str) -> None:
    """A replica being scaled down drains for at least as long as any request may run (the issue's 22 s request
    was killed by Serve's 20 s default)."""
    from aiflow_ray.serve.builder import deployment_options
    from aiflow_ray.serve.configs import profile_args

    args = AppArgs.model_validate(profile_args(profile))
    for tier in ("device", "edge", "cloud", "ingress"):
        options = deployment_options(args.tier(tier), tier)
        assert options["graceful_shutdown_timeout_s"] >= args.deadlines.request_s, tier
        assert options["backpressure_config"]["retry_after_s"] >= 1, tier


def test_the_gpu_profile_serves_every_tier_on_vllm_with_a_gpu_per_replica() -> None:
    config = yaml.safe_load((ROOT / "deployments" / "gpu.yaml").read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    for tier in ("device", "edge", "cloud"):
        settings = args.tier(tier)
        assert settings.engine == "vllm" and settings.num_gpus == 1 and settings.accelerator_type
        assert settings.vllm.kv_cache_bytes is None and 0 < settings.vllm.gpu_memory_utilization < 1
    # The vLLM edge batches: it admits many more verifies than one-forward-at-a-time engines.
    assert args.edge.max_ongoing_requests >= 32 and args.edge.vllm.max_num_seqs >= args.edge.max_ongoing_requests
    with pytest.raises(ValueError, match="vllm"):
        AppArgs.model_validate({"edge": {"vllm": {"max_num_seqs": 8, "typo": 1}}})
