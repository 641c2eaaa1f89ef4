"""Helpers shared by the tests that run the Serve application over HTTP."""

from __future__ import annotations

import requests

from deployments.args import AppArgs


def app_args(checkpoint, **overrides) -> AppArgs:
    """Args for the tiny checkpoint with test-sized limits; ``model=`` updates the model entry."""
    model = {
        "name": "tiny",
        "source": str(checkpoint),
        "aliases": ["tiny-alias"],
        "device": "cpu",
        "dtype": "float32",
        "max_length": 512,
        "deployment": {"ray_actor_options": {"num_cpus": 0}},
        "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.2},
    }
    model.update(overrides.pop("model", {}))
    args = {
        "models": [model],
        "chunk_pairs": 4,
        "chunk_tokens": 4096,
        "max_documents": 50,
        "max_request_chars": 20_000,
        "max_body_bytes": 200_000,
        "ingress": {"ray_actor_options": {"num_cpus": 0}},
    }
    args.update(overrides)
    return AppArgs(**args)


def post(url, body, **kwargs):
    """POST ``body`` as JSON with a timeout, so that a hung server fails the test."""
    return requests.post(url, json=body, timeout=60, **kwargs)


def close(a, b, tol=1e-5):
    """Assert two score lists are equal within ``tol``."""
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol
