"""Malformed, hostile and huge input: never a 5xx, never a hang, never a model loaded on request.

Property-based fuzzing of every route from the service's own OpenAPI (schemathesis), plus
hand-written cases the generator would not think of.
"""

from __future__ import annotations

import itertools
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from schemathesis.generation import GenerationMode

from deployments.app import build_app
from deployments.errors import STRING_ERROR_PREFIXES
from tests.reliability.conftest import report
from tests.service_helpers import app_args
from tests.test_engine import QUERY

TIMEOUT = 60


@pytest.fixture(scope="module")
def fuzz_service(ray_cluster, tiny_checkpoint):
    args = app_args(tiny_checkpoint, max_body_bytes=1_000_000, request_timeout_s=30)
    serve.run(build_app(args), name="fuzz", route_prefix="/fuzz")
    yield f"{ray_cluster}/fuzz"
    serve.delete("fuzz")


FUZZ_EXAMPLES = 40


def test_fuzzed_requests_never_get_a_server_error(fuzz_service):
    """Every operation of the service's OpenAPI, with valid and invalid generated requests."""
    api = schemathesis.openapi.from_url(f"{fuzz_service}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/rerank", "/v1/rerank", "/v2/rerank", "/health", "/v1/models"}
    statuses = []
    for operation, mode in itertools.product(operations, GenerationMode):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_service, timeout=TIMEOUT)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400 and case.path.startswith(STRING_ERROR_PREFIXES):
                body = response.json()  # TEI's error body, which these routes' clients read
                assert isinstance(body["error"], str) and body["error"] and body["error_type"]
            elif response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] == response.status_code and error["message"] and error["type"]

        check()
    report("fuzz", requests=len(statuses), **{str(k): statuses.count(k) for k in sorted(set(statuses))})
    assert 200 in statuses


def _post_raw(url, data: bytes, content_type="application/json"):
    return requests.post(url, data=data, headers={"content-type": content_type}, timeout=TIMEOUT)


def _assert_client_error(response, status=None):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.json()["error"]["code"] == response.status_code


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize(
    "name,data",
    [
        ("invalid json", b'{"query": "q", "documents": ["a"'),
        ("not an object", b'["q", "a"]'),
        ("wrong types", json.dumps({"query": 5, "documents": {"a": 1}, "model": "tiny"}).encode()),
        ("null", b"null"),
        ("empty body", b""),
        ("deeply nested", b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("invalid utf-8", b'{"query": "\xff\xfe q", "documents": ["\xc3\x28"], "model": "tiny"}'),
        ("nul bytes", b'{"query": "q\\u0000q", "documents": ["a\\u0000"], "model": "tiny", "top_n": "x"}'),
        ("huge number", b'{"query": "q", "documents": ["a"], "model": "tiny", "top_n": 1e400}'),
    ],
)
def test_malformed_bodies_get_4xx(fuzz_service, route, name, data):
    _assert_client_error(_post_raw(f"{fuzz_service}{route}", data))


def test_nul_bytes_in_text_are_scored(fuzz_service):
    r = requests.post(f"{fuzz_service}/rerank", json={"query": "q\x00q", "documents": ["a\x00b", ""]}, timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_wrong_content_type_is_a_4xx(fuzz_service):
    _assert_client_error(_post_raw(f"{fuzz_service}/rerank", b"query=q&documents=a", "application/x-www-form-urlencoded"))


def test_huge_query_body_and_document_count_get_413(fuzz_service):
    r = requests.post(f"{fuzz_service}/rerank", json={"query": "q" * 900_000, "documents": ["a"]}, timeout=TIMEOUT)
    _assert_client_error(r, 413)
    ten_mb = json.dumps({"query": "q", "documents": ["x" * 1000] * 10_000}).encode()
    _assert_client_error(_post_raw(f"{fuzz_service}/rerank", ten_mb), 413)
    many = json.dumps({"query": "q", "documents": ["a"] * 100_000}).encode()
    _assert_client_error(_post_raw(f"{fuzz_service}/v1/rerank", many), 413)


@pytest.mark.parametrize(
    "model", ["../../etc", "/tmp/x", "Qwen/Qwen3-Reranker-8B", "qwen3-reranker-0.6b", "tiny\x00", "", " tiny"]
)
def test_only_configured_models_serve(fuzz_service, model):
    before = serve.status().applications["fuzz"].deployments.keys()
    r = requests.post(f"{fuzz_service}/rerank", json={"query": QUERY, "documents": ["a"], "model": model}, timeout=TIMEOUT)
    _assert_client_error(r, 404)
    assert serve.status().applications["fuzz"].deployments.keys() == before


def test_unknown_paths_and_methods_are_4xx(fuzz_service):
    assert requests.get(f"{fuzz_service}/rerank", timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{fuzz_service}/../../etc/passwd", timeout=TIMEOUT).status_code == 404
