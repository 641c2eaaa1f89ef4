"""The application builder: ``import_path: deployments.app:build_app`` in a Serve config.

No ``from __future__ import annotations`` here: Serve validates the config's ``args`` only when
``build_app``'s annotation is the real :class:`AppArgs` class, not a string.
"""

from ray.serve import Application

from .args import AppArgs
from .ingress import RerankIngress
from .model_replica import ModelReplica


def model_deployment_name(model_name: str) -> str:
    """Name of a model's replica deployment (for the config's ``deployments:`` overrides)."""
    return f"model-{model_name}"


def build_app(args: AppArgs) -> Application:
    """Wire one replica deployment per configured model behind the ingress.

    Serve validates the config's ``args`` against :class:`AppArgs` before calling this.
    """
    models = [
        ModelReplica.options(
            name=model_deployment_name(m.name),
            user_config=m.batching.model_dump(),
            **m.deployment,
        ).bind(m, args.chunk_pairs)
        for m in args.models
    ]
    return RerankIngress.options(**args.ingress).bind(args, *models)
