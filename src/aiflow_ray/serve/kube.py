"""KubeRay manifests, generated: a kustomize base, the cpu / gpu / dev overlays, and the RayJobs.

One config path: a profile's ``AppArgs`` (serve/configs.py) -> ``deployments/<profile>.yaml`` and the
``serveConfigV2`` of the overlay that serves it (cpu: local, gpu: gpu, dev: dev), so a test can compare
the two. ``aiflow configs render`` writes everything here; nothing under k8s/ except the guide, the images
and the vendored CRDs is edited by hand.

Choices a reader of the manifests would ask about:
- The base is the cpu cluster (llama.cpp on every tier, no GPUs): it runs on any Kubernetes. Overlays replace
  ``serveConfigV2`` and the groups whole (a custom resource has no list merge keys, so a patch replaces
  lists anyway; generating them whole keeps each overlay readable on its own).
- Readiness: KubeRay deploys the Serve config only after the head pod is Ready (reconcileServe in KubeRay
  v1.7.0), so the head's probe cannot demand a ready application, or nothing would ever deploy. The head's
  probe keeps KubeRay's raylet and GCS checks and adds ``/readyz?serving=true`` once the application
  answers: a cluster whose tiers are still loading is not Ready, so a RayService upgrade moves traffic to it
  only when every tier reports, while a running cluster that lost a tier stays Ready and serves the paths
  left (a plain /readyz would turn a lost tier into a lost service).
- The knowledge base: every pod that hosts cloud replicas (and the head, which hosts the ingress) mounts
  one ReadWriteMany volume; the cloud tier reads versioned read-only snapshots from it (rag/snapshots.py),
  written by the ingestion RayJob or by an ingestion over the API.
- RayJobs bring their own clusters. ``clusterSelector`` names one RayCluster, and a RayService's cluster
  gets a generated name that changes on every upgrade; the sweep and the evaluation are HTTP clients of the
  service (measuring from inside the serving cluster would take the CPUs they measure), and ingestion's
  embedding actors should scale out on CPU nodes and go away after, not take serving capacity.
"""

from __future__ import annotations

from typing import Any

import yaml

from aiflow_ray.serve.configs import RAY_VERSION, serve_config

NAME = "aiflow"
NAMESPACE = "aiflow"
IMAGE = "aiflow-ray"  # built from k8s/images/ (CPU and CUDA Dockerfiles)
VERSION = "0.1.0"
TAGS = {"cpu": f"{VERSION}-cpu", "cuda": f"{VERSION}-cuda"}
SECRET = "aiflow-api"  # keys: api-key, admin-key
DATA_PVC = "aiflow-data"
DATA_MOUNT = "/mnt/aiflow"
KB_SNAPSHOTS = f"{DATA_MOUNT}/kb"
SERVE_URL = f"http://{NAME}-serve-svc:8000"  # the Service KubeRay creates for a RayService's traffic
OVERLAY_PROFILES = {"cpu": "local", "gpu": "gpu", "dev": "dev"}
TIERS = ("device", "edge", "cloud")
POD_HOST = "0.0.0.0"  # in a pod the proxy listens on every interface of the pod (the local profiles: 127.0.0.1)

# The head's readiness, see the module docstring: KubeRay's own checks, then the application once it answers
# (no answer or 404: not deployed yet, which must not block KubeRay from deploying it).
def head_readiness(raylet_port: int = 52365, dashboard_port: int = 8265, serve_port: int = 8000) -> str:
    """The head's readiness command (bash; wget is what KubeRay's own probes use in Ray's images)."""
    return (
        f"wget --tries 1 -T 2 -q -O- http://localhost:{raylet_port}/api/local_raylet_healthz | grep -q success && "
        f"wget --tries 1 -T 5 -q -O- http://localhost:{dashboard_port}/api/gcs_healthz | grep -q success && "
        f"code=$(wget --tries 1 -T 5 -S -O /dev/null 'http://localhost:{serve_port}/readyz?serving=true' 2>&1 "
        "| awk '/^ *HTTP\\//{c=$2} END{print c}') && "
        "{ [ -z \"$code\" ] || [ \"$code\" = 200 ] || [ \"$code\" = 404 ]; }"
    )


def _env(kb: bool) -> list[dict[str, Any]]:
    # Both keys from one secret; without an admin key, admin routes stay closed while an API key is set.
    env: list[dict[str, Any]] = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key, "optional": True}}}
        for var, key in (("AIFLOW_API_KEY", "api-key"), ("AIFLOW_ADMIN_KEY", "admin-key"))]
    if kb:
        env.append({"name": "AIFLOW_KB_SNAPSHOTS", "value": KB_SNAPSHOTS})
    return env


def _container(name: str, cpus: int, memory_gi: int, gpus: int = 0, kb: bool = False,
               image_tag: str = TAGS["cpu"]) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    limits = dict(requests)
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name, "image": f"{IMAGE}:{image_tag}", "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": requests, "limits": limits}, "env": _env(kb),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # Serve drains a replica for graceful_shutdown_timeout_s; the pod waits for Ray to stop first.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if kb:
        container["volumeMounts"] = [{"name": "data", "mountPath": DATA_MOUNT}]
    return container


def _pod(container: dict[str, Any], kb: bool, gpu: bool = False, component: str = "serving") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100},
        "terminationGracePeriodSeconds": 120,
        "containers": [container],
    }
    if kb:
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}}]
    if gpu:
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": component}},
            "spec": spec}


def _head(cpus: int, memory_gi: int, ray_cpus: int, labels: str, image_tag: str) -> dict[str, Any]:
    container = _container("ray-head", cpus, memory_gi, kb=True, image_tag=image_tag)
    container["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 8000, "name": "serve"}, {"containerPort": 8080, "name": "metrics"}]
    container["readinessProbe"] = {"exec": {"command": ["bash", "-c", head_readiness()]}, "initialDelaySeconds": 10,
                                   "periodSeconds": 5, "timeoutSeconds": 15, "failureThreshold": 3}
    params = {"num-cpus": str(ray_cpus), "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    if labels:
        params["labels"] = labels
    return {"rayStartParams": params, "template": _pod(container, kb=True)}


def _group(tier: str, replicas: tuple[int, int], cpus: int, memory_gi: int, gpus: int = 0,
           image_tag: str = TAGS["cpu"]) -> dict[str, Any]:
    kb = tier == "cloud"
    low, high = replicas
    container = _container("ray-worker", cpus, memory_gi, gpus, kb, image_tag)
    container["ports"] = [{"containerPort": 8080, "name": "metrics"}]  # what a PodMonitor scrapes
    return {
        "groupName": tier, "replicas": low, "minReplicas": low, "maxReplicas": high,
        # The tier label is what the deployments' label_selector matches (docs/design.md section 2); Ray adds
        # ray.io/accelerator-type itself on GPU nodes, which the gpu profile's accelerator_type asks for.
        "rayStartParams": {"labels": f"tier={tier}", "num-cpus": str(cpus), "metrics-export-port": "8080"},
        "template": _pod(container, kb, gpu=bool(gpus)),
    }


def _serve_config_v2(profile: str) -> str:
    # The RayService serves the text pair: the captioning pair is trained on first use, which a pod's
    # start-up probe should not wait for (the vision application is a `make run` and `aiflow deploy` feature).
    config = serve_config(profile, vision=False)
    config["http_options"] = {"host": POD_HOST, "port": 8000}
    return yaml.safe_dump(config, sort_keys=False)


def cluster_spec(overlay: str) -> dict[str, Any]:
    """The rayClusterConfig of an overlay."""
    autoscaler = {"idleTimeoutSeconds": 300, "upscalingMode": "Default",
                  "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"}}}
    if overlay == "cpu":
        # The local profile pins the ingress to the head (tier=head) with the proxy: the head gets CPUs for it.
        head = _head(4, 8, 2, "tier=head", TAGS["cpu"])
        groups = [_group("device", (1, 4), 4, 8), _group("edge", (1, 4), 8, 16), _group("cloud", (1, 2), 8, 16)]
    elif overlay == "gpu":
        head = _head(4, 8, 0, "tier=head", TAGS["cuda"])
        # The device group is smaller: a 0.5B drafter needs a fraction of what the verifiers need.
        groups = [_group("device", (1, 2), 4, 16, 1, TAGS["cuda"]), _group("edge", (1, 4), 8, 32, 1, TAGS["cuda"]),
                  _group("cloud", (1, 2), 8, 32, 1, TAGS["cuda"])]
    elif overlay == "dev":
        return {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": False,
                "headGroupSpec": _head(6, 16, 6, "", TAGS["cpu"]), "workerGroupSpecs": []}
    else:
        raise ValueError(f"unknown overlay {overlay!r}: {', '.join(OVERLAY_PROFILES)}")
    return {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": True, "autoscalerOptions": autoscaler,
            "headGroupSpec": head, "workerGroupSpecs": groups}


def _longest_request_s(overlay: str) -> int:
    from aiflow_ray.config.app import AppArgs
    from aiflow_ray.serve.configs import profile_args

    return int(AppArgs.model_validate(profile_args(OVERLAY_PROFILES[overlay])).deadlines.request_s)


def rayservice(overlay: str = "cpu") -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
        "spec": {
            "serveConfigV2": _serve_config_v2(OVERLAY_PROFILES[overlay]),
            # Zero-downtime upgrades: a changed cluster spec starts a new cluster, traffic moves when it is ready,
            # and the old one stays until the longest request it may still hold has ended.
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterDeletionDelaySeconds": _longest_request_s(overlay) + 60,
            "rayClusterConfig": cluster_spec(overlay),
        },
    }


def _patch(overlay: str) -> dict[str, Any]:
    full = rayservice(overlay)
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": NAME},
            "spec": {key: full["spec"][key] for key in ("serveConfigV2", "rayClusterDeletionDelaySeconds",
                                                        "rayClusterConfig")}}


def data_volume(access_mode: str = "ReadWriteMany", size: str = "20Gi") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": DATA_PVC, "labels": {"app.kubernetes.io/name": NAME}},
            "spec": {"accessModes": [access_mode], "resources": {"requests": {"storage": size}}}}


def _job_cluster(workers: dict[str, Any] | None) -> dict[str, Any]:
    head = _head(2, 4, 1, "", TAGS["cpu"])
    del head["template"]["spec"]["containers"][0]["readinessProbe"]  # no application on a job's cluster
    head["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "job"
    spec: dict[str, Any] = {"rayVersion": RAY_VERSION, "headGroupSpec": head, "workerGroupSpecs": []}
    if workers:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"idleTimeoutSeconds": 60}
        spec["workerGroupSpecs"] = [workers]
    return spec


# name -> (entrypoint, needs CPU workers, what it is)
JOBS: dict[str, tuple[str, bool, str]] = {
    "ingest-kb": (f"python -m aiflow_ray.jobs.ingest --snapshots {KB_SNAPSHOTS} --input {DATA_MOUNT}/corpus "
                  "--actors 8", True, "knowledge-base ingestion through Ray Data into a new snapshot version"),
    "tpot-sweep": (f"python -m aiflow_ray.jobs.tpot_sweep --url {SERVE_URL} --output {DATA_MOUNT}/results/tpot-sweep",
                   False, "TPOT sweep (server-only, fixed draft lengths, adaptive) per emulated bandwidth"),
    "batch-eval": (f"python -m aiflow_ray.jobs.batch_eval --url {SERVE_URL} "
                   f"--output {DATA_MOUNT}/results/batch-eval/results.jsonl", False,
                   "batch evaluation of the bundled prompts through the API"),
}


def rayjob(name: str) -> dict[str, Any]:
    entrypoint, workers, what = JOBS[name]
    embed = None
    if workers:
        embed = _group("embed", (0, 8), 4, 8)
        embed["rayStartParams"] = {"num-cpus": "4"}
        embed["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "job"
        embed["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": DATA_MOUNT}]
        embed["template"]["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}}]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"{NAME}-{name}", "labels": {"app.kubernetes.io/name": NAME},
                     "annotations": {"aiflow-ray/description": what}},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 4 * 3600,
            "backoffLimit": 0,
            "rayClusterSpec": _job_cluster(embed),
        },
    }


# The Grafana dashboard (serve/dashboard.py), shipped as a ConfigMap that Grafana's dashboard sidecar (as the
# kube-prometheus-stack chart runs it) picks up by its label.
DASHBOARD_FILE = "k8s/base/grafana/aiflow-dashboard.json"
DASHBOARD_CONFIGMAP = {"name": "aiflow-grafana-dashboard", "files": ["grafana/aiflow-dashboard.json"],
                       "options": {"labels": {"grafana_dashboard": "1"}, "disableNameSuffixHash": True}}


def _kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def manifests() -> dict[str, Any]:
    """Relative path under the repository -> object, for every generated file of k8s/."""
    out: dict[str, Any] = {
        "k8s/base/rayservice.yaml": rayservice("cpu"),
        "k8s/base/data-volume.yaml": data_volume(),
        "k8s/base/kustomization.yaml": _kustomization(resources=["rayservice.yaml", "data-volume.yaml"],
                                                      configMapGenerator=[DASHBOARD_CONFIGMAP]),
        "k8s/overlays/cpu/kustomization.yaml": _kustomization(namespace=NAMESPACE, resources=["../../base"],
                                                              images=[{"name": IMAGE, "newTag": TAGS["cpu"]}]),
    }
    for overlay, tag in (("gpu", TAGS["cuda"]), ("dev", TAGS["cpu"])):
        patches = [{"path": "rayservice-patch.yaml"}]
        if overlay == "dev":  # one node: a volume any single-node provisioner (kind, minikube) can give
            patches.append({"path": "data-volume-patch.yaml"})
            out["k8s/overlays/dev/data-volume-patch.yaml"] = data_volume("ReadWriteOnce", "5Gi")
        out[f"k8s/overlays/{overlay}/rayservice-patch.yaml"] = _patch(overlay)
        out[f"k8s/overlays/{overlay}/kustomization.yaml"] = _kustomization(
            namespace=NAMESPACE, resources=["../../base"], patches=patches,
            images=[{"name": IMAGE, "newTag": tag}])
    for name in JOBS:
        out[f"k8s/jobs/{name}.yaml"] = rayjob(name)
    return out

