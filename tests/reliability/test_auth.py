"""API keys: every route but /health needs a valid bearer token, and keys never leak."""

from __future__ import annotations

import glob
import os
import time

import pytest
import ray
import requests
from ray import serve

from deployments.app import build_app
from tests.service_helpers import app_args
from tests.test_engine import DOCS, QUERY

KEY = "sk-rerank-test-9f8e7d6c5b4a3928"
NEAR_MISS = KEY[:-1] + "0"
ROUTES = [
    ("post", "/rerank", {"query": QUERY, "documents": DOCS[:2]}),
    ("post", "/v1/rerank", {"query": QUERY, "documents": DOCS[:2]}),
    ("post", "/v2/rerank", {"model": "tiny", "query": QUERY, "documents": DOCS[:2]}),
    ("get", "/v1/models", None),
    ("get", "/openapi.json", None),
    ("get", "/docs", None),
    ("get", "/no-such-route", None),
]


@pytest.fixture(scope="module")
def keyed_service(ray_cluster, tiny_checkpoint):
    serve.run(build_app(app_args(tiny_checkpoint, api_keys=[KEY])), name="auth", route_prefix="/auth")
    yield f"{ray_cluster}/auth"
    serve.delete("auth")


def _call(base, method, path, body, headers):
    return requests.request(method, f"{base}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {NEAR_MISS}"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
     {"Authorization": "Bearer "}, {"Authorization": f"Bearer {KEY} extra"}],
    ids=["none", "near-miss", "no-scheme", "basic", "empty", "trailing"],
)
def test_every_route_but_health_needs_the_key(keyed_service, headers):
    for method, path, body in ROUTES:
        r = _call(keyed_service, method, path, body, headers)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["type"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert KEY not in r.text and NEAR_MISS not in r.text
    assert requests.get(f"{keyed_service}/health", headers=headers, timeout=60).status_code == 200


def test_the_key_opens_every_route(keyed_service):
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, body in ROUTES[:-1]:
        assert _call(keyed_service, method, path, body, headers).status_code == 200, path
    assert _call(keyed_service, "get", "/no-such-route", None, headers).status_code == 404


def test_keys_never_reach_the_logs(keyed_service):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {NEAR_MISS}"}):
        _call(keyed_service, "post", "/rerank", ROUTES[0][2], headers)
    time.sleep(2)  # let the log files flush
    session = ray._private.worker._global_node.get_session_dir_path()
    leaked = []
    for path in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                content = f.read()
            if KEY.encode() in content or NEAR_MISS.encode() in content:
                leaked.append(path)
    assert leaked == []
