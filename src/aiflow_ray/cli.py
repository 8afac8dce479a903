"""The ``aiflow`` command. Option defaults and help come from the pydantic config models, so the
CLI cannot drift from them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from aiflow_ray.api.schemas import KbSearchBody
from aiflow_ray.config import (
    PATHS,
    TIERS,
    GenerateOptions,
    GroundingOptions,
    KbArgs,
    LinkConfig,
    ModelPairConfig,
    ModelPreset,
    SamplingConfig,
)
from aiflow_ray.config.generation import ImageSource, UploadMode
from aiflow_ray.models.registry import DEFAULT_PAIR, REGISTRY, UnknownModelError
from aiflow_ray.units import format_bandwidth, parse_bandwidth_bps


def _field_help(model: type[BaseModel], name: str) -> tuple[Any, str]:
    info = model.model_fields[name]
    return info.default, info.description or ""


def _add(parser: argparse.ArgumentParser, flag: str, model: type[BaseModel], name: str, **kw: Any) -> None:
    default, desc = _field_help(model, name)
    parser.add_argument(flag, dest=name, default=default, help=f"{desc} (default: {default})", **kw)


def _draft_len(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"draft length must be an integer >= 1 or 'auto', got {text!r}") from None


def _bandwidth(text: str) -> float:
    try:
        return parse_bandwidth_bps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text on one path and print a trace")
    gen.add_argument("prompt", help="input text")
    _add(gen, "--path", GenerateOptions, "path", choices=PATHS)
    _add(gen, "--draft-len", GenerateOptions, "draft_len", type=_draft_len)
    _add(gen, "--max-new-tokens", GenerateOptions, "max_new_tokens", type=int)
    bw_default, bw_help = _field_help(LinkConfig, "bandwidth_bps")
    gen.add_argument("--bandwidth", type=_bandwidth, default=bw_default,
                     help=f"{bw_help} e.g. 500KB/s, 1MB/s, 2MB/s (default: {format_bandwidth(bw_default)})")
    rtt_default, _ = _field_help(LinkConfig, "rtt_s")
    gen.add_argument("--rtt-ms", type=float, default=rtt_default * 1000, help="round-trip latency in ms")
    _add(gen, "--temperature", SamplingConfig, "temperature", type=float)
    _add(gen, "--top-k", SamplingConfig, "top_k", type=int)
    _add(gen, "--top-p", SamplingConfig, "top_p", type=float)
    _add(gen, "--seed", SamplingConfig, "seed", type=int)
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    gen.add_argument("--models", choices=get_args(ModelPreset), default="default",
                     help="default = the Qwen2.5-Coder 0.5B/1.5B pair; tiny = random test models; tiny-vlm = random "
                     "InternVL test models; caption = the trained captioning pair")
    gen.add_argument("--image", action="append", default=[], help="an image file (JPEG, PNG, WebP) for a "
                     "vision-language pair; repeat for several; the prompt's <image> placeholders place them")
    gen.add_argument("--image-upload", choices=get_args(UploadMode), default="auto",
                     help="what of each image crosses the device link")
    _add(gen, "--drafter", ModelPairConfig, "drafter")
    _add(gen, "--verifier", ModelPairConfig, "verifier")
    _add(gen, "--dtype", ModelPairConfig, "dtype")
    _add(gen, "--device", ModelPairConfig, "device")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, trace)")

    cluster = sub.add_parser("cluster", help="local multi-node Ray cluster on 127.0.0.1")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_up = cluster_sub.add_parser("up", help="start a head and one labelled node per tier")
    cluster_up.add_argument("--gcs-port", type=int, default=6390)
    cluster_up.add_argument("--dashboard-port", type=int, default=8265)
    cluster_sub.add_parser("down", help="stop exactly the processes `up` started")
    cluster_sub.add_parser("status", help="print the recorded cluster")
    node = cluster_sub.add_parser("node", help="stop, crash or start a tier's node: fault drills")
    node.add_argument("action", choices=["stop", "crash", "start"],
                      help="stop: the whole node; crash: its raylet only (orphaned workers live on); start: a new one")
    node.add_argument("tier", choices=list(TIERS))

    deploy = sub.add_parser("deploy", help="deploy a profile to the running local cluster and wait until healthy")
    deploy.add_argument("--profile", choices=["local", "tiny", "dev"], default="local")
    deploy.add_argument("--http-port", type=int, default=8000)
    deploy.add_argument("--timeout-s", type=float, default=900.0)
    deploy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one application argument, e.g. --set edge.engine=hf (repeatable); "
                        "vision.* keys go to the vision application, e.g. --set vision.link.rtt_s=0.05")
    deploy.add_argument("--no-vision", dest="vision", action="store_false",
                        help="serve the text pair only (no vision application at /vision)")

    configs = sub.add_parser("configs", help="render deployments/*.yaml and k8s/ from the builder's profiles")
    configs.add_argument("action", choices=["render"])

    kb = sub.add_parser("kb", help="knowledge base: fetch demo corpora, ingest files, search")
    kb.add_argument("--kb", dest="kb_path", type=Path, default=None,
                    help="knowledge base file (default: AIFLOW_KB_PATH or AIFLOW_HOME/kb/default.sqlite)")
    kb.add_argument("--snapshots", type=Path, default=None, help="a directory of versioned snapshots instead "
                    "(rag/snapshots.py; default: AIFLOW_KB_SNAPSHOTS when set)")
    kb_sub = kb.add_subparsers(dest="kb_command", required=True)
    kb_fetch = kb_sub.add_parser("fetch", help="write the demo corpora (pydoc, foldoc) as JSONL and print their paths")
    kb_fetch.add_argument("corpora", nargs="*", default=["pydoc", "foldoc"])
    kb_ingest = kb_sub.add_parser("ingest", help="ingest text, markdown or JSONL files (idempotent)")
    kb_ingest.add_argument("paths", nargs="+", type=Path)
    _add(kb_ingest, "--chunk-chars", KbArgs, "chunk_chars", type=int)
    _add(kb_ingest, "--overlap-chars", KbArgs, "overlap_chars", type=int)
    kb_search = kb_sub.add_parser("search", help="nearest chunks to a query")
    kb_search.add_argument("query")
    _add(kb_search, "--top-k", KbSearchBody, "top_k", type=int)
    kb_search.add_argument("--json", action="store_true", help="print a JSON list of hits")
    kb_sub.add_parser("stats", help="documents, chunks and version of the knowledge base")
    kb_sub.add_parser("versions", help="snapshots: the published versions and their manifests")
    kb_sub.add_parser("rollback", help="snapshots: publish an old version again as the newest").add_argument(
        "version", type=int)
    kb_prune = kb_sub.add_parser("prune", help="snapshots: delete versions superseded longer than --grace-s ago")
    _add(kb_prune, "--keep", KbArgs, "snapshots_keep", type=int)
    _add(kb_prune, "--grace-s", KbArgs, "snapshots_grace_s", type=float)

    models = sub.add_parser("models", help="list or fetch models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="registered models and whether they are cached")
    fetch = models_sub.add_parser("fetch", help="fetch, verify and cache models (default: the default pair)")
    fetch.add_argument("names", nargs="*", help="registered names (default: the default pair and tiny)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from aiflow_ray.tiers.pipeline import Pipeline

    pair_overrides = {k: getattr(args, k) for k in ("dtype", "device")}
    if args.models != "default":
        models = ModelPairConfig.for_preset(args.models, **pair_overrides)
    else:
        models = ModelPairConfig(drafter=args.drafter, verifier=args.verifier, **pair_overrides)
    opts = GenerateOptions(
        prompt=args.prompt,
        path=args.path,
        draft_len=args.draft_len,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
        link=LinkConfig(bandwidth_bps=args.bandwidth, rtt_s=args.rtt_ms / 1000.0),
        grounding=GroundingOptions() if args.path == "device-edge-cloud" else None,
        images=tuple(ImageSource(data=Path(path).read_bytes(), field=f"--image {path}") for path in args.image),
        image_upload=args.image_upload,
    )
    pipeline = Pipeline.load(models)
    if args.path == "device-edge-cloud":  # the cloud in process: the knowledge base and the verifier's model
        from aiflow_ray.tiers.cloud import CloudService

        pipeline.cloud = CloudService(pipeline.verifier_engine, KbArgs())
    result = pipeline.run(opts)
    trace = result.trace.to_dict()
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "trace": trace}))
        return 0
    print(result.text)
    print("--- trace", file=sys.stderr)
    for key in ("path", "rounds", "draft_lens", "acceptance_rate", "alpha", "bytes_up", "bytes_down",
                "ttft_s", "tpot_s", "total_s", "draft_s", "verify_s", "link_s", "context_resends", "num_tokens",
                *(("image_upload", "image_bytes_raw", "image_bytes_sent") if opts.images else ())):
        value = trace[key]
        print(f"{key:>16}: {round(value, 4) if isinstance(value, float) else value}", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    from aiflow_ray.engines.loader import built_model_dir
    from aiflow_ray.models.fetch import cached_model_dir, fetch_model, is_cached

    if args.models_command == "list":
        for name, listed in sorted(REGISTRY.items()):
            state = "built on demand" if listed.tiny else ("cached" if is_cached(name) else "not fetched")
            print(f"{name:32} {listed.role:9} {state}")
        return 0
    # The default pair, the test models, and the captioning pair (trained here once, a few minutes).
    names = args.names or [*DEFAULT_PAIR, "tiny-verifier", "tiny-vllm-verifier", "tiny-vlm-verifier",
                           "caption-verifier"]
    for name in names:
        entry = REGISTRY.get(name)
        if entry is None:
            raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}")
        if entry.tiny:
            print(f"{name}: {built_model_dir(entry.tiny)}")
        else:
            print(f"{name}: {fetch_model(name)}")
            assert is_cached(name), cached_model_dir(name)
    return 0


STATE_DIR = Path(".aiflow")


def _cluster(args: argparse.Namespace) -> int:
    from aiflow_ray import cluster

    recorded = cluster.load(STATE_DIR)
    if args.cluster_command == "status":
        print(json.dumps(recorded.__dict__ if recorded else None))
        return 0
    if recorded is not None and not cluster.supervisor_alive(recorded):
        # Left by a reboot or a kill: nothing there to keep, and it must not block `make run`.
        print(f"found a stale cluster record (its supervisor, PID {recorded.supervisor_pid}, is gone); "
              f"stopped {cluster.down(STATE_DIR)} processes left of it")
        if args.cluster_command == "down":
            return 0
        recorded = None
    if args.cluster_command == "node":
        cluster.node_command(STATE_DIR, args.action, args.tier)
        print(f"{args.tier} node: {args.action} done")
        return 0
    if args.cluster_command == "down":
        print(f"stopped {cluster.down(STATE_DIR)} processes" if recorded else "no local cluster is running")
        return 0
    if recorded is not None:
        if (recorded.gcs_port, recorded.dashboard_port) != (args.gcs_port, args.dashboard_port):
            raise RuntimeError(f"a local cluster is already running at {recorded.address} (dashboard "
                               f"{recorded.dashboard_url}); stop it with `aiflow cluster down` to use other ports")
        print(f"cluster already running at {recorded.address} (dashboard {recorded.dashboard_url})")
        return 0
    started = cluster.up(STATE_DIR, gcs_port=args.gcs_port, dashboard_port=args.dashboard_port)
    print(f"cluster up at {started.address} (dashboard {started.dashboard_url}), {len(started.pids)} processes")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    import yaml

    from aiflow_ray import cluster
    from aiflow_ray.serve.configs import parse_overrides, serve_config

    info = cluster.load(STATE_DIR)
    if info is None or not cluster.supervisor_alive(info):
        raise RuntimeError("no local cluster is running: run `aiflow cluster up` first")
    config = serve_config(args.profile, args.http_port, parse_overrides(args.overrides), vision=args.vision)
    apps = [(app["name"], app["route_prefix"].rstrip("/")) for app in config["applications"]]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    serve_bin = str(Path(sys.executable).with_name("serve"))
    # The cluster wants its token from every client: set the mode here, not only in the Makefile, so that
    # `aiflow deploy` works from any shell.
    deployed = subprocess.run([serve_bin, "deploy", handle.name, "--address", info.dashboard_url],
                              env={**os.environ, **cluster.AUTH_ENV})
    Path(handle.name).unlink()
    if deployed.returncode != 0:
        raise RuntimeError(f"`serve deploy` to {info.dashboard_url} failed (its error is above)")
    url = f"http://127.0.0.1:{args.http_port}"
    for prefix in cluster.wait_for_apps(info, url, apps, args.timeout_s, STATE_DIR / "cluster.log"):
        print(f"{url}{prefix}")
    return 0


def _kb(args: argparse.Namespace) -> int:
    from aiflow_ray import envs
    from aiflow_ray.rag import corpora
    from aiflow_ray.rag.retriever import Retriever
    from aiflow_ray.rag.snapshots import SnapshotStore
    from aiflow_ray.rag.store import IngestError, KnowledgeBase, QueryError, read_documents

    path = args.kb_path or envs.kb_path()
    snapshots = args.snapshots or envs.kb_snapshots_dir()
    if args.kb_command == "fetch":
        for name in args.corpora:
            print(corpora.fetch(name))
        return 0
    chunking = [getattr(args, "chunk_chars", 1000), getattr(args, "overlap_chars", 200)]
    kb: KnowledgeBase | SnapshotStore = SnapshotStore(snapshots, *chunking) if snapshots else \
        KnowledgeBase(path, *chunking)
    if args.kb_command in ("versions", "rollback", "prune"):
        if not isinstance(kb, SnapshotStore):
            print(f"aiflow: kb {args.kb_command} needs --snapshots DIR (or AIFLOW_KB_SNAPSHOTS)", file=sys.stderr)
            return 2
        try:
            out: Any = ([kb.manifest(v) for v in kb.versions()] if args.kb_command == "versions" else
                        {"published": kb.rollback(args.version)} if args.kb_command == "rollback" else
                        {"deleted": kb.prune(args.snapshots_keep, args.snapshots_grace_s)})
        except IngestError as exc:
            print(f"aiflow: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(out, indent=2))
        return 0
    if args.kb_command == "stats":
        print(json.dumps(kb.stats(), indent=2))
        return 0
    from aiflow_ray.rag.embedder import Embedder

    if args.kb_command == "ingest":
        try:
            # Read every file first, so a bad file fails the command before anything is written.
            documents = [doc for p in args.paths for doc in read_documents(p)]
        except IngestError as exc:
            print(f"aiflow: cannot ingest {exc}", file=sys.stderr)
            return 2
        stats = kb.ingest(documents, Embedder(), progress=True)
        if isinstance(stats, tuple):  # a snapshot store also says which version holds the documents
            stats = stats[0]
        print(json.dumps({**stats.__dict__, **kb.stats()}, indent=2))
        return 0
    try:
        hits = Retriever(kb, Embedder()).search(args.query, top_k=args.top_k)
    except QueryError as exc:
        print(f"aiflow: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, start=1):
            snippet = " ".join(hit.text.split())[:160]
            print(f"{rank}. {hit.score:.3f}  {hit.chunk_id}\n   {snippet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "kb":
            return _kb(args)
        if args.command == "configs":
            from aiflow_ray.serve.render import render

            for path in render(Path.cwd()):
                print(path)
            return 0
        return _models(args)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "input"
            print(f"aiflow: invalid {field}: {err['msg']}", file=sys.stderr)
        return 2
    except (UnknownModelError, ValueError) as exc:
        print(f"aiflow: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # integrity and fetch errors carry their own explanation
        print(f"aiflow: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
