"""Schema-driven fuzzing of every served route (schemathesis), with the API key and without it.

Bodies valid and invalid are generated from the served OpenAPI schema; each answer must not be a 5xx
other than a documented 503 with Retry-After, must match the status codes, content types and body
schemas the schema documents, must reject invalid data with a 4xx, and must come within the client's
timeout (no hang). The admin routes are fuzzed with the API key (403) and without a key (401), never
with the admin key: fuzzed link settings would slow every other test on this cluster.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 60.0
MIN_REQUESTS = 1000
SENT = {"count": 0}


@pytest.fixture(scope="module")
def operations(serve_url: str) -> list[Any]:
    # An open path: no key needed. The base URL is the schema's own location.
    schema = schemathesis.openapi.from_url(f"{serve_url}/openapi.json", timeout=30)
    return [result.ok() for result in schema.get_all_operations()]


def _check_retryable(response: Any) -> None:
    # A 503 is allowed (no tier free now) only as the documented, retryable answer.
    if response.status_code == 503:
        assert response.headers.get("retry-after"), "a 503 without Retry-After"
    assert response.status_code != 500, response.text[:300]


def _call(case: Any, headers: dict[str, str]) -> None:
    started = time.monotonic()
    response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
    SENT["count"] += 1
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    _check_retryable(response)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                              response_schema_conformance, negative_data_rejection])
    if response.status_code != 503:
        case.validate_response(response, checks=[not_a_server_error])


def _fuzz(operations: list[Any], headers: dict[str, str], examples: int) -> None:
    """Valid and invalid requests for every operation (pytest 9 cannot run schemathesis' lazy loader, so
    hypothesis is driven here, one operation at a time)."""
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                _call(case, headers)

            try:
                run()
            except Unsatisfiable:  # an operation with no parameters or body has no invalid form
                assert mode is GenerationMode.NEGATIVE


def test_every_route_with_the_api_key(operations: list[Any]) -> None:
    _fuzz(operations, {"Authorization": f"Bearer {API_KEY}"}, examples=100)


def test_every_route_without_a_key(operations: list[Any]) -> None:
    _fuzz(operations, {}, examples=40)


def test_enough_requests_were_fuzzed() -> None:
    assert SENT["count"] >= MIN_REQUESTS, SENT
