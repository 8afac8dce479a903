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


class _Slow(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(ANSWER_S)
        body = json.dumps({"token_ids": [1, 2, 3], "usage": {"completion_tokens": 3}, "trace": {"path": "x"},
                           "choices": [{"text": "abc"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def slow_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_requests_in_flight_at_a_ramp_down_and_at_the_end_are_answered(slow_url: str, tmp_path: Path) -> None:
    # 4 users, then 1: three users are asked to stop while their 5 s requests are in flight, and the run
    # ends a second later with all of them still in flight. Every request sent must come back answered.
    settings = load_run.Settings(url=slow_url, dashboard="", user_interval_s=2.0, request_timeout_s=10,
                                 max_tokens=3, work_dir=tmp_path)
    outcome = load_run.run_locust(settings, [(2.5, 2.0), (1.0, 0.5)], "drain", None, progress=lambda _m: None)
    summary = load_run.summarize(outcome)
    assert summary["requests"] >= 3, summary
    assert summary["lost"] == 0, summary["errors"]
    assert summary["ok"] == summary["requests"], summary
    # The run waited for the last answers rather than ending with the last stage.
    assert outcome.ended_at - outcome.started_at >= ANSWER_S


def test_a_request_the_generator_abandons_counts_as_lost() -> None:
    record = {"id": 1, "sent_t": 0.0, "done_t": 1.0, "status": 0, "abandoned": True,
              "error": "abandoned: the load generator stopped this user mid-request"}
    assert load_run.classify(record) == "lost"
    assert load_run.classify({"id": 2, "sent_t": 0.0}) == "lost"
    assert load_run.classify({"id": 3, "sent_t": 0.0, "done_t": 1.0, "status": 200}) == "ok"
