"""The service's HTTP layer as clients meet it."""

from __future__ import annotations

import json

import pytest
import requests
from ray import serve

from deployments.app import build_app
from tests.service_helpers import app_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_checkpoint):
    serve.run(build_app(app_args(tiny_checkpoint)), name="clients", route_prefix="/")
    yield ray_cluster
    serve.delete("clients")


# The JSON layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b'{"query": "q",\n "documents": ["a",]}', b"{not json", b'{"query": "q"} x'])
def test_a_json_body_that_does_not_parse_says_what_and_where(service, data):
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(data)
    r = requests.post(f"{service}/rerank", data=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    e = parsed.value
    assert r.json()["error"]["message"] == (
        f"the body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (char {e.pos})"
    )


def test_an_empty_json_body_is_told_to_send_an_object(service):
    r = requests.post(f"{service}/rerank", data=b"", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["message"] == "the body is empty: send a JSON object"
