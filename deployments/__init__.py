"""Ray Serve application for Qwen3-Reranker: a validating HTTP ingress over model replicas.

``deployments`` is a thin layer over :mod:`rerank_core`: it validates requests, tokenizes on the
ingress, fans chunks out to model replicas that batch them across requests, and merges results.
"""
