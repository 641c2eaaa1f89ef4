"""Custom Serve metrics (exported with Ray's metrics; deployment/replica/app tags are added by Serve).

Names as exported to Prometheus get the ``ray_`` prefix, e.g. ``ray_rerank_pairs_scored_total``.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

_FRACTION_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class ReplicaMetrics:
    """Metrics of a model replica: what each batch did."""

    def __init__(self, model: str):
        tags = {"model": model}
        self.pairs = Counter("rerank_pairs_scored", description="Document pairs scored.", tag_keys=("model",))
        self.tokens = Counter("rerank_tokens_scored", description="Real tokens run through the model.", tag_keys=("model",))
        self.passes = Counter("rerank_forward_passes", description="Forward passes run.", tag_keys=("model",))
        self.chunks = Counter("rerank_chunks_scored", description="Chunks (request pieces) scored.", tag_keys=("model",))
        self.batch_fill = Histogram(
            "rerank_batch_fill",
            description="Padded tokens per forward pass over max_batch_tokens.",
            boundaries=_FRACTION_BOUNDARIES,
            tag_keys=("model",),
        )
        self.padding = Histogram(
            "rerank_padding_ratio",
            description="Share of padded tokens that were padding, per batch.",
            boundaries=_FRACTION_BOUNDARIES,
            tag_keys=("model",),
        )
        for metric in (self.pairs, self.tokens, self.passes, self.chunks, self.batch_fill, self.padding):
            # Serve adds its own tags into the dict it is given: give each metric a copy.
            metric.set_default_tags(dict(tags))


class IngressMetrics:
    """Metrics of the ingress: latency and outcome per route."""

    def __init__(self):
        self.latency = Histogram(
            "rerank_request_latency_ms",
            description="Time from request to response, per route and status.",
            boundaries=_LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "status"),
        )
        self.requests = Counter(
            "rerank_requests", description="Requests answered, per route and status.", tag_keys=("route", "status")
        )
        self.retries = Counter(
            "rerank_chunk_retries", description="Chunks sent again because their replica died."
        )

    def observe(self, route: str, status: int, latency_ms: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.latency.observe(latency_ms, tags=tags)
        self.requests.inc(tags=tags)
