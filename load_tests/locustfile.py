"""Locust scenarios against the aiflow API: a realistic mix, paced, recorded request by request.

Run by ``load_tests/run.py`` (``locust --headless``), which sets its parameters in the environment:

- ``AIFLOW_LOAD_STAGES``: JSON ``[[duration_s, rate_rps, users], ...]``, the step shape; the run ends after the
  last. A stage with ``users`` above 0 runs that many users in a closed loop (no pacing) instead of a rate.
- ``AIFLOW_LOAD_USER_INTERVAL_S``: seconds between one user's requests; users = rate x interval, so the
  offered rate holds while latency stays under the interval (past it the users are all busy: closed loop).
- ``AIFLOW_LOAD_RECORDS``: a JSONL file; each request writes a ``sent`` line before and a ``done`` line after.
- ``AIFLOW_LOAD_MAX_REQUESTS``: the run stops once this many were sent.
- ``AIFLOW_LOAD_REQUEST_TIMEOUT_S``: a request unanswered after this long is abandoned (the runner counts it lost).
- ``AIFLOW_LOAD_MAX_TOKENS``, ``AIFLOW_LOAD_LINKS`` (JSON list of link ids), ``AIFLOW_LOAD_MODELS``
  (JSON ``[verifier, drafter]``, as ``/v1/models`` lists them).

Every request carries ``Authorization: Bearer $AIFLOW_API_KEY`` when that is set. Targets 127.0.0.0/8 only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import time
from typing import Any
from urllib.parse import urlparse

from gevent import GreenletExit
from locust import HttpUser, LoadTestShape, events, task

STAGES: list[tuple[float, float, int]] = [(float(d), float(r), int(u)) for d, r, u, *_ in (
    [*stage, 0] for stage in json.loads(os.environ.get("AIFLOW_LOAD_STAGES", "[[30, 1.0]]")))]
USER_INTERVAL_S = float(os.environ.get("AIFLOW_LOAD_USER_INTERVAL_S", "10"))
MAX_REQUESTS = int(os.environ.get("AIFLOW_LOAD_MAX_REQUESTS", "1000"))
REQUEST_TIMEOUT_S = float(os.environ.get("AIFLOW_LOAD_REQUEST_TIMEOUT_S", "120"))
MAX_TOKENS = int(os.environ.get("AIFLOW_LOAD_MAX_TOKENS", "24"))
LINKS: list[str] = json.loads(os.environ.get("AIFLOW_LOAD_LINKS", '["device-0"]'))
MODELS: list[str] = json.loads(os.environ.get("AIFLOW_LOAD_MODELS", '["aiflow", "aiflow"]'))
RECORDS = os.environ.get("AIFLOW_LOAD_RECORDS", "load_records.jsonl")

PROMPTS = [
    "Write a Python function that reverses a list.",
    "Explain what a Python generator is in two sentences.",
    "def fibonacci(n):",
    "Write a function that checks whether a string is a palindrome.",
    "How do I read a JSON file in Python?",
    "Write a SQL query that counts orders per customer.",
]
GROUNDED = [
    "What does the with statement do?",
    "What is a closure?",
    "How does Python's import system find modules?",
    "What is a hash table?",
]

_lock = threading.Lock()
_ids = itertools.count()
_out: Any = None
_sent = 0
_quitting = False
_in_flight = 0
# Past the last stage no request starts; the run ends once those in flight are answered (or after one
# request timeout). Ending at once would lose them: locust's quit kills the greenlet still waiting on the
# users a ramp-down asked to stop, and those users die mid-request at exit (seen as a request sent and
# never answered).
_draining = False
# Whether the current stage is a closed loop: its users send again as soon as they are answered.
_closed_loop = False


def _write(record: dict[str, Any]) -> None:
    global _out
    with _lock:
        if _out is None:
            _out = open(RECORDS, "a", buffering=1)  # noqa: SIM115 - one line per write, kept open for the run
        _out.write(json.dumps(record) + "\n")


@events.test_start.add_listener
def _loopback_only(environment: Any, **_kw: Any) -> None:
    host = urlparse(environment.host or "").hostname or ""
    if not (host.startswith("127.") or host == "localhost"):
        raise SystemExit(f"load tests target this machine only (127.0.0.0/8 or localhost), not {host!r}")


class StepShape(LoadTestShape):
    """The stages one after another: users = rate x interval, spawned within a second or two."""

    _last: tuple[int, float] | None = None

    def tick(self) -> tuple[int, float] | None:
        global _draining, _closed_loop
        elapsed_s = self.get_run_time()
        for duration_s, rate_rps, closed_users in STAGES:
            if elapsed_s < duration_s:
                _closed_loop = closed_users > 0
                users = closed_users or max(1, math.ceil(rate_rps * USER_INTERVAL_S))
                self._last = (users, max(users, 1))
                return self._last
            elapsed_s -= duration_s
        _draining = True
        with _lock:
            in_flight = _in_flight
        if in_flight and elapsed_s < REQUEST_TIMEOUT_S + 5:
            return self._last  # unchanged: no user is started or stopped while the last requests finish
        return None


class ApiUser(HttpUser):
    def on_start(self) -> None:
        key = os.environ.get("AIFLOW_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        # As a client with a deadline should: the server refuses at once (503, Retry-After) a request its
        # queue would hold past it, instead of answering after this client gave up.
        self.client.headers["X-Request-Timeout-S"] = f"{REQUEST_TIMEOUT_S:g}"
        # Users start together at each step: spread their first requests over one interval (a closed loop's
        # over a second).
        time.sleep(random.uniform(0, 1.0 if _closed_loop else USER_INTERVAL_S))
        self._next_at = time.monotonic()

    def wait_time(self) -> float:
        """One request per interval, on a schedule of its own; a request that overran it is not made up for
        with a burst (past the interval the user simply waits on the server). In a closed loop: none."""
        if _closed_loop:
            self._next_at = time.monotonic()
            return 0.0
        self._next_at = max(self._next_at + USER_INTERVAL_S, time.monotonic())
        return self._next_at - time.monotonic()

    # -- the mix: weights are rough shares of traffic ----------------------------------------------
    @task(3)
    def native_auto(self) -> None:
        self._native({"quality": random.choice(["exact", "exact", "fast"])}, "native-auto",
                     stream=random.random() < 0.3)

    @task(3)
    def native_forced(self) -> None:
        path = random.choice(["device-edge", "device-edge", "server-only", "on-device"])
        self._native({"path": path}, f"native-{path}", stream=random.random() < 0.5)

    @task(1)
    def native_grounded(self) -> None:
        body = {"path": "device-edge-cloud", "prompt": random.choice(GROUNDED), "retrieval_top_k": 2,
                "beam_width": 2, "generation": random.choice(["beam", "speculative"])}
        self._native(body, "native-device-edge-cloud", stream=False)

    @task(2)
    def chat(self) -> None:
        stream = random.random() < 0.5
        body: dict[str, Any] = {"model": random.choice(MODELS), "max_tokens": MAX_TOKENS, "temperature": 0,
                                "ignore_eos": True, "stream": stream,
                                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        self._send("/v1/chat/completions", body, "openai-chat", stream)

    @task(1)
    def completion(self) -> None:
        stream = random.random() < 0.5
        body: dict[str, Any] = {"model": MODELS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                                "stream": stream, "prompt": random.choice(PROMPTS)}
        if stream:
            body["stream_options"] = {"include_usage": True}
        self._send("/v1/completions", body, "openai-completions", stream)

    # -- sending and recording -------------------------------------------------------------------
    def _native(self, extra: dict[str, Any], kind: str, stream: bool) -> None:
        body = {"prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "link_id": random.choice(LINKS), "stream": stream, **extra}
        self._send("/v1/generate", body, kind, stream)

    def _send(self, route: str, body: dict[str, Any], kind: str, stream: bool) -> None:
        global _sent, _quitting, _in_flight
        with _lock:
            if _draining:
                return
            over = _sent >= MAX_REQUESTS
            first_over = over and not _quitting
            _quitting = _quitting or over
            _sent += 0 if over else 1
            _in_flight += 0 if over else 1
        if first_over:
            self.environment.runner.quit()
        if over:
            return
        try:
            self._send_and_record(route, body, kind, stream)
        finally:
            with _lock:
                _in_flight -= 1

    def _send_and_record(self, route: str, body: dict[str, Any], kind: str, stream: bool) -> None:
        rid = next(_ids)
        _write({"ev": "sent", "id": rid, "t": time.time(), "kind": kind, "stream": stream,
                "link": body.get("link_id")})
        started = time.perf_counter()
        done: dict[str, Any] = {"ev": "done", "id": rid, "status": 0}
        try:
            with self.client.post(route, json=body, stream=stream, catch_response=True, name=kind,
                                  timeout=(10, REQUEST_TIMEOUT_S)) as response:
                done["status"] = response.status_code
                done["retry_after"] = response.headers.get("Retry-After") if response.status_code else None
                if response.status_code == 200 and stream:
                    self._read_stream(response, started, done)
                elif response.status_code == 200:
                    self._read_body(response.json(), done)
                error = getattr(response, "error", None)
                if error is not None:
                    done["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    done["timeout"] = "timeout" in type(error).__name__.lower()
                elif response.status_code != 200:
                    done["error"] = response.text[:200]
                if done.get("error"):
                    response.failure(done["error"])
                else:
                    response.success()
        except Exception as exc:  # a broken stream, a body that is not JSON: recorded, never raised into locust
            done["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            done["timeout"] = "timeout" in type(exc).__name__.lower()
        except GreenletExit:
            # Killed by locust itself (a stop past --stop-timeout): the client got no answer, so the request
            # is lost, and the record says why.
            done.update(error="abandoned: the load generator stopped this user mid-request", abandoned=True,
                        e2e_s=time.perf_counter() - started, t=time.time())
            _write(done)
            raise
        done["e2e_s"] = time.perf_counter() - started
        done["t"] = time.time()
        _write(done)

    @staticmethod
    def _read_body(out: dict[str, Any], done: dict[str, Any]) -> None:
        usage = out.get("usage") or {}
        tokens = usage.get("completion_tokens", len(out.get("token_ids", [])))
        done["tokens"] = tokens
        path = (out.get("trace") or {}).get("path") or (out.get("route") or {}).get("path")
        done["path"] = path

    @staticmethod
    def _read_stream(response: Any, started: float, done: dict[str, Any]) -> None:
        first_s: float | None = None
        tokens = 0
        deadline = started + REQUEST_TIMEOUT_S
        for raw in response.iter_lines():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"stream still open after {REQUEST_TIMEOUT_S:.0f} s")
            line = raw.decode() if isinstance(raw, bytes) else raw
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                done["error"] = f"in-stream error: {str(event['error'])[:200]}"
                break
            if "choices" in event:  # OpenAI chunk
                choice = (event["choices"] or [{}])[0]
                has_tokens = bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens", tokens)
            else:  # native event: a round's token ids (their text may wait for a split character)
                has_tokens = bool(event.get("token_ids"))
                if event.get("done"):
                    tokens = event.get("num_tokens", tokens)
                    done["path"] = (event.get("trace") or {}).get("path")
            if has_tokens and first_s is None:
                first_s = time.perf_counter() - started
        end_s = time.perf_counter() - started
        done["tokens"] = tokens
        if first_s is not None:
            done["ttft_s"] = first_s
            if tokens >= 2:
                done["tpot_s"] = (end_s - first_s) / (tokens - 1)
