"""The load generator itself (load_tests/locustfile.py under load_tests/run.py): a request in flight when the
step shape ramps down and ends is answered, not dropped by the generator, and a request locust kills is
recorded as lost with the reason. Against a real HTTP server on 127.0.0.1 that answers slowly."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from load_tests import run as load_run

ANSWER_S = 5.0
QUICK_ANSWER_S = 0.25


class _Slow(BaseHTTPRequestHandler):
    answer_s = ANSWER_S
    in_flight = 0
    most_in_flight = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        time.sleep(self.answer_s)
        with cls.lock:
            cls.in_flight -= 1
        body = json.dumps({"token_ids": [1, 2, 3], "usage": {"completion_tokens": 3}, "trace": {"path": "x"},
                           "choices": [{"text": "abc"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class _Quick(_Slow):
    answer_s = QUICK_ANSWER_S
    in_flight = 0
    most_in_flight = 0


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def slow_url() -> Iterator[str]:
    yield from _serve(_Slow)


@pytest.fixture
def quick_url() -> Iterator[str]:
    yield from _serve(_Quick)


def test_requests_in_flight_at_a_ramp_down_and_at_the_end_are_answered(slow_url: str, tmp_path: Path) -> None:
    # 4 users, then 1: three users are asked to stop while their 5 s requests are in flight, and the run
    # ends a second later with all of them still in flight. Every request sent must come back answered.
    settings = load_run.Settings(url=slow_url, dashboard="", user_interval_s=2.0, request_timeout_s=10,
                                 max_tokens=3, work_dir=tmp_path)
    stages = [load_run.Stage(2.5, 2.0), load_run.Stage(1.0, 0.5)]
    outcome = load_run.run_locust(settings, stages, "drain", None, progress=lambda _m: None)
    summary = load_run.summarize(outcome)
    assert summary["requests"] >= 3, summary
    assert summary["lost"] == 0, summary["errors"]
    assert summary["ok"] == summary["requests"], summary
    # The run waited for the last answers rather than ending with the last stage.
    assert outcome.ended_at - outcome.started_at >= ANSWER_S


def test_a_closed_loop_stage_holds_its_users_requests_in_flight(quick_url: str, tmp_path: Path) -> None:
    # Paced at one request per 10 s, 3 users would send about 3 requests in 3 s; in a closed loop each sends
    # its next as soon as the last (0.25 s) is answered, so the server holds 3 at a time, and never more.
    settings = load_run.Settings(url=quick_url, dashboard="", user_interval_s=10.0, request_timeout_s=10,
                                 max_tokens=3, work_dir=tmp_path)
    users, duration_s = 3, 3.0
    outcome = load_run.run_locust(settings, [load_run.Stage(duration_s, 0.0, users)], "closed", None,
                                  progress=lambda _m: None)
    summary = load_run.summarize(outcome)
    assert summary["lost"] == 0 and summary["ok"] == summary["requests"], summary
    # Users start within a second of each other; each then answers back to back.
    assert summary["requests"] >= users * (duration_s - 1.0) / QUICK_ANSWER_S * 0.6, summary
    assert _Quick.most_in_flight == users


def test_the_step_shape_holds_its_peak_as_a_closed_loop_when_asked() -> None:
    paced = load_run.shape_stages(2.0, 2.0, 10.0)
    assert [s.rate_rps for s in paced] == [0.5, 1.0, 2.0, 3.0, 4.0, 4.0, 2.0, 1.0, 0.5]
    assert all(s.users == 0 for s in paced)
    closed = load_run.shape_stages(2.0, 2.0, 10.0, peak_users=8)
    assert [(s.rate_rps, s.users) for s in closed][3:7] == [(3.0, 0), (0.0, 8), (0.0, 8), (2.0, 0)]


def test_a_request_the_generator_abandons_counts_as_lost() -> None:
    record = {"id": 1, "sent_t": 0.0, "done_t": 1.0, "status": 0, "abandoned": True,
              "error": "abandoned: the load generator stopped this user mid-request"}
    assert load_run.classify(record) == "lost"
    assert load_run.classify({"id": 2, "sent_t": 0.0}) == "lost"
    assert load_run.classify({"id": 3, "sent_t": 0.0, "done_t": 1.0, "status": 200}) == "ok"
