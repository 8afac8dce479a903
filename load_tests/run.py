"""Bounded locust load test of the aiflow API with replica sampling; writes load.json and load.png.

    make load-test PROFILE=tiny                 # or: .venv/bin/python -m load_tests.run --profile tiny
    .venv/bin/python -m load_tests.run --url http://127.0.0.1:8000 --dashboard http://127.0.0.1:8265 \\
        --sustainable-rps 2 --no-cluster        # against a cluster that is already serving

What it does, every step bounded in count and time, and only towards 127.0.0.0/8:

1. Finds the API at ``--url``. When nothing answers there it starts a local cluster on its own ports
   (``--gcs-port``, ``--dashboard-port``), deploys ``--profile`` on ``--http-port``, and stops both at the end.
2. Sets the emulated bandwidth and RTT of several device links through ``PUT /v1/admin/links/{id}``.
3. Takes the sustainable rate from ``--sustainable-rps``, or measures it: steps of ``--ramp-step-s`` at rates
   growing by ``--ramp-factor`` until the median latency doubles over the lowest step median, or more than 5% of
   the requests are refused or fail, twice in a row; the last step before that is the sustainable rate.
4. Runs locust headless with a step shape up to ``--peak-factor`` times that rate (or, with ``--peak-users N``,
   up to N users in a closed loop) and back down
   (``load_tests/locustfile.py``), sampling each deployment's running replicas from the Serve dashboard
   every second, then waits (at most ``--scale-down-wait-s``) for the replicas to come back down.
5. Writes the summary (``--out-json``) and the time series plot (``--out-png``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# Link id -> (bandwidth in bytes/s, RTT in ms): a good Wi-Fi link down to a poor cellular one.
LINKS: dict[str, tuple[float, float]] = {
    "device-0": (2e6, 5.0), "device-1": (500e3, 20.0), "device-2": (100e3, 40.0), "device-3": (20e3, 80.0),
}
# The main run's shape, in multiples of the sustainable rate: up in steps to the peak, held, and back down.
SHAPE = (0.25, 0.5, 1.0, 1.5, "peak", "peak", 1.0, 0.5, 0.25)
RAMP_MAX_STEPS = 8
# Per profile, what a flag left unset means: the real models answer 24 tokens in about 4 s on 2 cores, the
# tiny ones in well under 1 s, so steps, user pacing and timeouts scale with them.
PROFILE_DEFAULTS: dict[str, dict[str, float]] = {
    "tiny": {"ramp_start_rps": 0.5, "ramp_step_s": 30, "step_s": 20, "user_interval_s": 10,
             "request_timeout_s": 120, "scale_down_wait_s": 180},
    "local": {"ramp_start_rps": 0.1, "ramp_step_s": 45, "step_s": 40, "user_interval_s": 40,
              "request_timeout_s": 300, "scale_down_wait_s": 300},
}
RAMP_LATENCY_FACTOR = 2.0
RAMP_MAX_REFUSED = 0.05

Progress = Callable[[str], None]


def _print(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host.startswith("127.") or host == "localhost"


def user_headers() -> dict[str, str]:
    key = os.environ.get("AIFLOW_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def admin_headers() -> dict[str, str]:
    key = os.environ.get("AIFLOW_ADMIN_KEY") or os.environ.get("AIFLOW_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- replicas -------------------------------------------------------------------------------------
def replica_states(dashboard: str, app: str) -> dict[str, tuple[int, int]]:
    """(running, target) replicas per deployment of ``app``, from the Serve dashboard API. The target is the
    autoscaler's decision; the time from a new target to as many running is a replica's start-up."""
    from aiflow_ray.cluster import dashboard_headers

    status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10, headers=dashboard_headers()).json()
    deployments = (status.get("applications") or {}).get(app, {}).get("deployments") or {}
    return {name: (sum(1 for r in info.get("replicas", []) if r.get("state") == "RUNNING"),
                   int(info.get("target_num_replicas") or 0))
            for name, info in deployments.items()}


def replica_counts(dashboard: str, app: str) -> dict[str, int]:
    """Running replicas per deployment of ``app``."""
    return {name: running for name, (running, _) in replica_states(dashboard, app).items()}


class ReplicaSampler:
    """Samples ``replica_counts`` every ``period_s`` in a thread; a failed sample is skipped, not fatal."""

    def __init__(self, dashboard: str, app: str, period_s: float = 1.0) -> None:
        self.dashboard, self.app, self.period_s = dashboard, app, period_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.targets: list[tuple[float, dict[str, int]]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                states = replica_states(self.dashboard, self.app)
                now = time.time()
                self.samples.append((now, {name: running for name, (running, _) in states.items()}))
                self.targets.append((now, {name: target for name, (_, target) in states.items()}))
            except (httpx.HTTPError, ValueError, KeyError):
                self.failures += 1
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def latest(self) -> dict[str, int]:
        return self.samples[-1][1] if self.samples else {}

    def wait_for_deployments(self, timeout_s: float) -> dict[str, int]:
        """The first sample naming the application's deployments, each with a running replica."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest = self.latest()
            if latest and all(count > 0 for count in latest.values()):
                return latest
            time.sleep(0.2)
        raise RuntimeError(f"the dashboard showed no running deployments of {self.app} within {timeout_s:.0f} s")

    def __enter__(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- one locust run -------------------------------------------------------------------------------
class Stage(NamedTuple):
    """One step of the load: ``rate_rps`` offered by paced users, or, when ``users`` is set, that many users in a
    closed loop (each sends its next request as soon as the last is answered; ``rate_rps`` is then 0)."""

    duration_s: float
    rate_rps: float
    users: int = 0


@dataclass
class Settings:
    url: str
    dashboard: str
    app: str = "aiflow"
    user_interval_s: float = 10.0
    max_requests: int = 2000
    request_timeout_s: float = 120.0
    max_tokens: int = 24
    links: list[str] = field(default_factory=lambda: list(LINKS))
    models: list[str] = field(default_factory=lambda: ["aiflow", "aiflow"])
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aiflow-load-")))


@dataclass
class Outcome:
    """What a locust run recorded: one dict per request (sent and, when answered, done) and the replicas."""

    records: list[dict[str, Any]]
    samples: list[tuple[float, dict[str, int]]]
    started_at: float
    ended_at: float
    stages: list[Stage]
    targets: list[tuple[float, dict[str, int]]] = field(default_factory=list)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Join the ``sent`` and ``done`` lines by request id; a request without ``done`` was never answered."""
    by_id: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed locust
        if event.pop("ev") == "sent":
            event["sent_t"] = event.pop("t")
            by_id[event["id"]] = event
        elif event["id"] in by_id:
            event["done_t"] = event.pop("t")
            by_id[event["id"]].update(event)
    return sorted(by_id.values(), key=lambda r: r["sent_t"])


def run_locust(settings: Settings, stages: list[Stage], label: str, sampler: ReplicaSampler | None,
               progress: Progress = _print) -> Outcome:
    """Run locust headless over ``stages`` and return every request's record."""
    if not _loopback(settings.url):
        raise ValueError("load tests target this machine only (127.0.0.0/8 or localhost)")
    records_path = settings.work_dir / f"{label}.jsonl"
    records_path.unlink(missing_ok=True)
    stop_timeout_s = settings.request_timeout_s + 5
    env = {**os.environ, "AIFLOW_LOAD_STAGES": json.dumps(stages),
           "AIFLOW_LOAD_USER_INTERVAL_S": str(settings.user_interval_s),
           "AIFLOW_LOAD_MAX_REQUESTS": str(settings.max_requests),
           "AIFLOW_LOAD_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
           "AIFLOW_LOAD_MAX_TOKENS": str(settings.max_tokens), "AIFLOW_LOAD_LINKS": json.dumps(settings.links),
           "AIFLOW_LOAD_MODELS": json.dumps(settings.models), "AIFLOW_LOAD_RECORDS": str(records_path)}
    command = [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless",
               "--host", settings.url, "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0",
               "--stop-timeout", str(int(stop_timeout_s))]
    bound_s = sum(stage.duration_s for stage in stages) + stop_timeout_s + 30
    log_path = settings.work_dir / f"{label}.locust.log"
    started = time.time()
    with log_path.open("w") as log:
        # A process of its own: locust's gevent monkey-patching must not reach this process's threads.
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        last_report = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if time.time() - started > bound_s:
                    progress(f"{label}: locust still running after {bound_s:.0f} s; stopping it")
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
                if time.monotonic() - last_report >= 10:
                    last_report = time.monotonic()
                    progress(_progress_line(label, read_records(records_path), started, stages, sampler))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode not in (0, 1):
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"locust exited with {proc.returncode}; its log ({log_path}) ends:\n{tail}")
    records = read_records(records_path)
    progress(_progress_line(label, records, started, stages, sampler) + " (done)")
    return Outcome(records, list(sampler.samples) if sampler else [], started, time.time(), stages)


def _current_load(stages: list[Stage], elapsed_s: float) -> str:
    for stage in stages:
        if elapsed_s < stage.duration_s:
            return f"{stage.users} users in a closed loop" if stage.users else f"offered {stage.rate_rps:.2f} req/s"
        elapsed_s -= stage.duration_s
    return "offered 0.00 req/s"


def _progress_line(label: str, records: list[dict[str, Any]], started: float, stages: list[Stage],
                   sampler: ReplicaSampler | None) -> str:
    elapsed_s = time.time() - started
    codes = Counter(r.get("status") for r in records if "done_t" in r)
    pending = sum(1 for r in records if "done_t" not in r)
    replicas = sampler.latest() if sampler else {}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(replicas.items()) if k not in ("Router",))
    return (f"{label}: {elapsed_s:5.0f} s, {_current_load(stages, elapsed_s)}, sent {len(records)}, "
            f"answered {dict(sorted(codes.items(), key=lambda kv: str(kv[0])))}, in flight {pending}"
            + (f"; replicas: {shown}" if shown else ""))


# -- classification and summary -------------------------------------------------------------------
def classify(record: dict[str, Any]) -> str:
    """ok, rejected_503, rejected_429, lost (never answered, timed out, or abandoned by the load generator),
    errors_other."""
    if "done_t" not in record or record.get("timeout") or record.get("abandoned"):
        return "lost"
    status = record.get("status")
    if status == 200 and not record.get("error"):
        return "ok"
    if status == 503:
        return "rejected_503"
    if status == 429:
        return "rejected_429"
    return "errors_other"


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "count": len(values)}


def summarize(outcome: Outcome) -> dict[str, Any]:
    records = outcome.records
    classes = Counter(classify(r) for r in records)
    ok = [r for r in records if classify(r) == "ok"]
    rejected = [r for r in records if classify(r) in ("rejected_503", "rejected_429")]
    first_replicas = outcome.samples[0][1] if outcome.samples else {}
    replicas_max: dict[str, int] = {}
    for _, counts in outcome.samples:
        for name, count in counts.items():
            replicas_max[name] = max(replicas_max.get(name, 0), count)
    errors = Counter(f"{r.get('status')}: {str(r.get('error'))[:120]}" for r in records
                     if classify(r) in ("errors_other", "lost"))
    by_kind: dict[str, Counter[str]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], Counter())[classify(r)] += 1
    return {
        "requests": len(records), "ok": classes["ok"], "rejected_503": classes["rejected_503"],
        "rejected_429": classes["rejected_429"], "errors_other": classes["errors_other"], "lost": classes["lost"],
        "retry_after_missing": sum(1 for r in rejected if not r.get("retry_after")),
        "replicas_before": first_replicas, "replicas_max": replicas_max,
        "ttft_s": _quantiles([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
        "tpot_s": _quantiles([r["tpot_s"] for r in ok if r.get("tpot_s") is not None]),
        "e2e_s": _quantiles([r["e2e_s"] for r in ok]),
        "duration_s": outcome.ended_at - outcome.started_at,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "errors": dict(errors.most_common(10)),
    }


def scaling_events(outcome: Outcome) -> list[dict[str, Any]]:
    """Each change of a deployment's target replicas, and how long until as many ran (its start-up or drain)."""
    events: list[dict[str, Any]] = []
    previous: dict[str, int] = {}
    for index, (t, targets) in enumerate(outcome.targets):
        for name, target in targets.items():
            if name in previous and target != previous[name]:
                reached = next((ts for ts, counts in outcome.samples[index:] if counts.get(name) == target), None)
                events.append({"deployment": name, "at_s": round(t - outcome.started_at, 1), "from": previous[name],
                               "to": target, "running_after_s": None if reached is None else round(reached - t, 1)})
            previous[name] = target
    return events


def step_stats(outcome: Outcome) -> dict[str, Any]:
    records = outcome.records
    refused = sum(1 for r in records if classify(r) != "ok")
    e2e = [r["e2e_s"] for r in records if classify(r) == "ok"]
    return {"rate_rps": outcome.stages[0].rate_rps, "requests": len(records), "ok": len(e2e),
            "refused_or_failed": refused, "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99)}


# -- sustainable rate -----------------------------------------------------------------------------
def measure_sustainable(settings: Settings, start_rps: float, factor: float, step_s: float,
                        progress: Progress = _print) -> tuple[float, list[dict[str, Any]]]:
    """The highest step rate whose median latency stays within 2x the lowest step median, with at most 5% of
    the requests refused or failed. The steps follow each other, so replicas the autoscaler added during one
    serve the next: this is the rate the deployment sustains with its autoscaling, up to max_replicas.

    A short warm-up at the first rate comes first (the first requests after a deployment run cold), and a
    step past the knee is run once more before it counts: with a mix whose kinds differ 10x in latency, a
    step's median over a few dozen requests can double by the draw alone.
    """
    run_locust(settings, [Stage(min(step_s, 10.0), start_rps)], "ramp-warmup", None, progress)
    steps: list[dict[str, Any]] = []
    rate = start_rps
    sustainable = start_rps
    retried = False
    for index in range(RAMP_MAX_STEPS + 1):
        outcome = run_locust(settings, [Stage(step_s, rate)], f"ramp-{index}", None, progress)
        stats = step_stats(outcome)
        steps.append(stats)
        baseline = min((s["e2e_p50_s"] for s in steps if s["e2e_p50_s"] is not None), default=None)
        p50 = stats["e2e_p50_s"]
        refused_share = stats["refused_or_failed"] / max(stats["requests"], 1)
        held = p50 is not None and baseline is not None and p50 <= RAMP_LATENCY_FACTOR * baseline
        held = held and refused_share <= RAMP_MAX_REFUSED
        stats["held"] = held
        verdict = "held" if held else ("past the knee" if retried else "past the knee? once more")
        progress(f"ramp step {index}: {rate:.2f} req/s, p50 {p50 if p50 is None else round(p50, 3)} s "
                 f"(lowest {baseline if baseline is None else round(baseline, 3)} s), "
                 f"{refused_share:.0%} refused or failed: {verdict}")
        if not held and retried:
            break
        if not held:
            retried = True
            continue
        retried = False
        sustainable = rate
        rate = round(rate * factor, 3)
    return sustainable, steps


# -- the cluster ------------------------------------------------------------------------------------
def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=3, headers=user_headers()).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(url: str, timeout_s: float, progress: Progress = _print) -> None:
    """Until ``/readyz`` says every tier reported. With the key: under a route prefix the probes want it too."""
    started = last_report = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout_s:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5, headers=user_headers())
            if response.status_code == 200:
                progress(f"{url} ready after {time.monotonic() - started:.0f} s")
                return
            last = response.text[:200]
        except httpx.HTTPError as exc:
            last = str(exc)
        if time.monotonic() - last_report >= 20:
            last_report = time.monotonic()
            progress(f"waiting for {url}/readyz: {last}")
        time.sleep(2)
    raise RuntimeError(f"{url} did not become ready within {timeout_s:.0f} s: {last}")


@contextlib.contextmanager
def serving(args: argparse.Namespace, progress: Progress = _print) -> Iterator[str]:
    """The API to load: the one answering at ``args.url``, else a cluster and deployment of our own (stopped
    at the end, and only what was started here)."""
    if _answers(args.url):
        progress(f"using the API already at {args.url}")
        wait_ready(args.url, args.deploy_timeout_s, progress)
        yield args.url
        return
    if args.no_cluster:
        raise RuntimeError(f"nothing answers at {args.url} (and --no-cluster was given)")
    from aiflow_ray import cluster
    from aiflow_ray.serve.configs import serve_config

    os.environ.update(cluster.LOOPBACK_ENV)
    state_dir = Path(args.state_dir)
    recorded = cluster.load(state_dir)
    if recorded is not None and not cluster.supervisor_alive(recorded):
        cluster.down(state_dir)  # left by a run that did not end cleanly
        recorded = None
    started_cluster = recorded is None
    if started_cluster:
        progress(f"starting a local cluster (GCS {args.gcs_port}, dashboard {args.dashboard_port}) in {state_dir}")
        info = cluster.up(state_dir, gcs_port=args.gcs_port, dashboard_port=args.dashboard_port,
                          cpus_per_node=args.cpus_per_node)
    else:
        assert recorded is not None
        info = recorded
        progress(f"using the cluster recorded in {state_dir} ({info.address})")
    try:
        config = serve_config(args.profile, args.http_port, vision=False)  # the load is on the text pair
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            import yaml

            yaml.safe_dump(config, handle, sort_keys=False)
        progress(f"deploying the {args.profile} profile on port {args.http_port}")
        deployed = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", handle.name,
                                   "--address", info.dashboard_url], env={**os.environ, **cluster.AUTH_ENV})
        Path(handle.name).unlink()
        if deployed.returncode != 0:
            raise RuntimeError(f"`serve deploy` to {info.dashboard_url} failed (its error is above)")
        wait_ready(args.url, args.deploy_timeout_s, progress)
        yield args.url
    finally:
        if started_cluster:
            progress(f"stopping the cluster started here: {cluster.down(state_dir)} processes")


def set_links(url: str, progress: Progress = _print) -> None:
    with httpx.Client(base_url=url, headers=admin_headers(), timeout=30) as client:
        for link_id, (bandwidth_bps, rtt_ms) in LINKS.items():
            response = client.put(f"/v1/admin/links/{link_id}", json={"bandwidth_bps": bandwidth_bps,
                                                                       "rtt_ms": rtt_ms})
            response.raise_for_status()
    progress("links: " + ", ".join(f"{k} {v[0] / 1e3:.0f} KB/s {v[1]:.0f} ms" for k, v in LINKS.items()))


def served_models(url: str) -> list[str]:
    response = httpx.get(f"{url}/v1/models", headers=user_headers(), timeout=30)
    response.raise_for_status()
    ids = [m["id"] for m in response.json()["data"]]
    return ids[:2] if len(ids) >= 2 else [*ids, *ids][:2]


def wait_scale_down(dashboard: str, app: str, target: dict[str, int], timeout_s: float,
                    sampler: ReplicaSampler, progress: Progress = _print) -> tuple[dict[str, int], float | None]:
    """Wait until every deployment is back at (or under) ``target``; return the counts and how long it took."""
    started = last_report = time.monotonic()
    counts = sampler.latest()
    while time.monotonic() - started < timeout_s:
        counts = sampler.latest()
        # The autoscaler's targets too: a replica still starting is not running, but it will be.
        targets = sampler.targets[-1][1] if sampler.targets else {}
        if counts and all(max(counts.get(name, 0), targets.get(name, 0)) <= n for name, n in target.items()):
            return counts, time.monotonic() - started
        time.sleep(1)
        if time.monotonic() - last_report >= 10:
            last_report = time.monotonic()
            progress(f"waiting for scale-down to {target}: now {counts}")
    return counts, None


# -- the plot --------------------------------------------------------------------------------------
def plot(outcome: Outcome, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = outcome.started_at
    end_s = max([s[0] - t0 for s in outcome.samples] + [outcome.ended_at - t0])
    bins = range(int(end_s) + 1)
    fig, (ax_rate, ax_lat, ax_rep) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)

    def per_s(times: list[float], window_s: int = 5) -> list[float]:
        counts = Counter(int(t) for t in times)
        return [sum(counts.get(b - k, 0) for k in range(window_s)) / window_s for b in bins]

    sent = [r["sent_t"] - t0 for r in outcome.records]
    ok = [r["done_t"] - t0 for r in outcome.records if classify(r) == "ok"]
    refused = [r["done_t"] - t0 for r in outcome.records if classify(r) in ("rejected_503", "rejected_429")]
    failed = [r.get("done_t", outcome.ended_at) - t0 for r in outcome.records
              if classify(r) in ("errors_other", "lost")]
    offered_t, offered = [0.0], [outcome.stages[0].rate_rps]
    elapsed = 0.0
    shaded = False
    for stage in outcome.stages:
        # A closed loop offers no rate: its span is shaded instead, and "sent" shows what it drew.
        rate = math.nan if stage.users else stage.rate_rps
        offered_t += [elapsed, elapsed + stage.duration_s]
        offered += [rate, rate]
        if stage.users:
            ax_rate.axvspan(elapsed, elapsed + stage.duration_s, color="grey", alpha=0.12,
                            label=None if shaded else f"{stage.users} users, closed loop")
            shaded = True
        elapsed += stage.duration_s
    ax_rate.plot(offered_t, offered, color="grey", linestyle="--", label="offered (shape)")
    ax_rate.plot(bins, per_s(sent), label="sent")
    ax_rate.plot(bins, per_s(ok), label="answered 200")
    ax_rate.plot(bins, per_s(refused), label="refused 503/429")
    if failed:
        ax_rate.plot(bins, per_s(failed), label="errors + lost")
    ax_rate.set_ylabel("requests/s (5 s mean)")
    ax_rate.axhline(summary["sustainable_rps"], color="black", linewidth=0.6, linestyle=":", label="sustainable")
    ax_rate.legend(loc="upper right", fontsize=8)

    window_s = 10
    done_ok = [(r["done_t"] - t0, r) for r in outcome.records if classify(r) == "ok"]
    centers, p50, p99, ttft = [], [], [], []
    for b in range(0, int(end_s) + 1, 2):
        inside = [r for t, r in done_ok if b - window_s < t <= b]
        if len(inside) < 3:
            continue
        centers.append(b)
        p50.append(percentile([r["e2e_s"] for r in inside], 50))
        p99.append(percentile([r["e2e_s"] for r in inside], 99))
        firsts = [r["ttft_s"] for r in inside if r.get("ttft_s") is not None]
        ttft.append(percentile(firsts, 50) if firsts else float("nan"))
    ax_lat.plot(centers, p50, label="e2e p50")
    ax_lat.plot(centers, p99, label="e2e p99")
    ax_lat.plot(centers, ttft, label="TTFT p50 (streams)")
    ax_lat.set_ylabel(f"seconds ({window_s} s window)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right", fontsize=8)

    names = sorted({n for _, c in outcome.samples for n in c if n != "Router"})
    for offset, name in enumerate(names):
        ts = [t - t0 for t, _ in outcome.samples]
        # A small offset per deployment keeps equal counts from hiding each other.
        line = ax_rep.step(ts, [c.get(name, 0) + 0.04 * offset for _, c in outcome.samples], where="post",
                           label=name)[0]
        ax_rep.step([t - t0 for t, _ in outcome.targets], [c.get(name, 0) + 0.04 * offset for _, c in outcome.targets],
                    where="post", color=line.get_color(), linestyle=":", linewidth=0.8)
    ax_rep.yaxis.get_major_locator().set_params(integer=True)
    ax_rep.set_ylabel("running replicas (dotted: target)")
    ax_rep.set_xlabel("seconds since the start of the step load")
    ax_rep.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"aiflow load test, {summary['profile']} profile, {summary['date']}: {summary['requests']} requests, "
                 f"sustainable {summary['sustainable_rps']:.2f} req/s ({summary['sustainable_rate_source']})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the whole run ------------------------------------------------------------------------------
def shape_stages(sustainable_rps: float, peak_factor: float, step_s: float, peak_users: int = 0) -> list[Stage]:
    """SHAPE in req/s; with ``peak_users`` the peak is that many users in a closed loop instead of a rate.

    A rate is a load only relative to the box's speed: a rate one machine queues at, a faster one (or a faster
    release) serves with room to spare, and nothing scales. A closed loop of N users holds N requests in flight
    on any machine, fast or slow, and never more, so it passes a replica's target without burying the tiers.
    """
    return [Stage(step_s, 0.0, peak_users) if m == "peak" and peak_users
            else Stage(step_s, round(sustainable_rps * (peak_factor if m == "peak" else float(m)), 3))
            for m in SHAPE]


def run(args: argparse.Namespace, progress: Progress = _print) -> dict[str, Any]:
    """Everything but the cluster: links, the sustainable rate, the step load, scale-down; the summary."""
    for name, value in PROFILE_DEFAULTS[args.profile].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    url = args.url
    settings = Settings(url=url, dashboard=args.dashboard, app=args.app, user_interval_s=args.user_interval_s,
                        max_requests=args.max_requests, request_timeout_s=args.request_timeout_s,
                        max_tokens=args.max_tokens, models=served_models(url))
    set_links(url, progress)
    calibration: list[dict[str, Any]] = []
    if args.sustainable_rps:
        sustainable, source = args.sustainable_rps, "flag"
    else:
        sustainable, calibration = measure_sustainable(settings, args.ramp_start_rps, args.ramp_factor,
                                                       args.ramp_step_s, progress)
        source = "measured"
    progress(f"sustainable rate {sustainable:.2f} req/s ({source})")
    stages = shape_stages(sustainable, args.peak_factor, args.step_s, args.peak_users)
    with ReplicaSampler(args.dashboard, args.app) as sampler:
        # A first sample that shows the application's deployments before the load: the dashboard can answer
        # without them for a while after a deploy (or not answer at all when busy), and an empty "before"
        # would make every later count look like a scale-up that never came back down.
        sampler.wait_for_deployments(timeout_s=60)
        if calibration:  # the ramp may have scaled the tiers up: start the step load from the idle state
            wait_scale_down(args.dashboard, args.app, _min_replicas(args), args.scale_down_wait_s, sampler, progress)
        before = sampler.latest()
        progress(f"replicas before the step load: {before}")
        outcome = run_locust(settings, stages, "step", sampler, progress)
        after, scale_down_s = wait_scale_down(args.dashboard, args.app, before, args.scale_down_wait_s, sampler,
                                              progress)
        outcome.samples = [(t, c) for t, c in sampler.samples if t >= outcome.started_at - 2]
        outcome.targets = [(t, c) for t, c in sampler.targets if t >= outcome.started_at - 2]
    summary = summarize(outcome)
    summary.update({
        "replicas_before": before, "replicas_after": after, "scale_down_s": scale_down_s,
        "scaling_events": scaling_events(outcome),
        "scale_down_wait_s": args.scale_down_wait_s,
        "sustainable_rps": sustainable, "sustainable_rate_source": source, "calibration_steps": calibration,
        "peak_rps": max(stage.rate_rps for stage in stages), "peak_users": args.peak_users,
        "stages": [stage._asdict() for stage in stages],
        "user_interval_s": args.user_interval_s, "max_tokens": args.max_tokens,
        "links": {k: {"bandwidth_bps": v[0], "rtt_ms": v[1]} for k, v in LINKS.items()},
        "profile": args.profile, "models": settings.models, "app": args.app,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m load_tests.run", *(shlex.quote(a) for a in sys.argv[1:])])
        if args.record_command else None,
        "replica_samples_failed": sampler.failures, "records_path": str(settings.work_dir / "step.jsonl"),
    })
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(summary, indent=2) + "\n")
        progress(f"wrote {args.out_json}")
    if args.out_png:
        plot(outcome, summary, Path(args.out_png))
        progress(f"wrote {args.out_png}")
    return summary


def _min_replicas(args: argparse.Namespace) -> dict[str, int]:
    from aiflow_ray.config import AppArgs
    from aiflow_ray.serve.configs import profile_args

    parsed = AppArgs.model_validate(profile_args(args.profile))
    names = {"device": "DeviceDrafter", "edge": "EdgeVerifier", "cloud": "CloudService", "ingress": "Ingress"}
    return {name: max(parsed.tier(tier).autoscaling.min_replicas, 1) for tier, name in names.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "local"], default="tiny", help="profile deployed (and recorded)")
    parser.add_argument("--http-port", type=int, default=8129)
    parser.add_argument("--gcs-port", type=int, default=6395)
    parser.add_argument("--dashboard-port", type=int, default=8271)
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of each node of a cluster started")
    parser.add_argument("--state-dir", default=".aiflow/load-test", help="where a cluster started here is recorded")
    parser.add_argument("--url", help="API to load (default: 127.0.0.1 at --http-port)")
    parser.add_argument("--dashboard", help="Serve dashboard (default: 127.0.0.1 at --dashboard-port)")
    parser.add_argument("--app", default="aiflow", help="Serve application whose replicas are sampled")
    parser.add_argument("--no-cluster", action="store_true", help="never start a cluster; fail if nothing answers")
    parser.add_argument("--deploy-timeout-s", type=float, default=900.0)
    parser.add_argument("--sustainable-rps", type=float, help="skip the ramp and take this rate as sustainable")
    parser.add_argument("--ramp-start-rps", type=float, help="first rate of the ramp (default: per profile)")
    parser.add_argument("--ramp-factor", type=float, default=1.5)
    parser.add_argument("--ramp-step-s", type=float, help="duration of each ramp step (default: per profile)")
    parser.add_argument("--peak-factor", type=float, default=2.0, help="peak of the step load / sustainable rate")
    parser.add_argument("--peak-users", type=int, default=0,
                        help="hold the peak as this many users in a closed loop instead of a rate (0: a rate)")
    parser.add_argument("--step-s", type=float, help="duration of each step of the load (default: per profile)")
    parser.add_argument("--user-interval-s", type=float, help="seconds between one simulated user's requests "
                        "(users = rate x interval; default: per profile)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-requests", type=int, default=3000, help="hard bound on requests per locust run")
    parser.add_argument("--request-timeout-s", type=float,
                        help="a request unanswered after this long counts as lost (default: per profile)")
    parser.add_argument("--scale-down-wait-s", type=float, help="default: per profile")
    parser.add_argument("--out-json", default=str(ROOT / "docs" / "benchmarks" / "load.json"))
    parser.add_argument("--out-png", default=str(ROOT / "docs" / "benchmarks" / "load.png"))
    parser.add_argument("--record-command", action=argparse.BooleanOptionalAction, default=True,
                        help="write the command line into the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.url = args.url or f"http://127.0.0.1:{args.http_port}"
    args.dashboard = args.dashboard or f"http://127.0.0.1:{args.dashboard_port}"
    for target in (args.url, args.dashboard):
        if not _loopback(target):
            parser.error("load tests target this machine only (127.0.0.0/8 or localhost)")
    with serving(args):
        summary = run(args)
    keys = ("requests", "ok", "rejected_503", "rejected_429", "errors_other", "lost", "retry_after_missing",
            "replicas_max", "replicas_after", "ttft_s", "tpot_s", "sustainable_rps")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
