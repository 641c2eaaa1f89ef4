"""Which models autoscaling has scaled to zero, read from Serve's controller, for ``/health``.

A call to a model with no replica starts one (a cold start), so ``/health`` must not call such a
model to see whether it is alive. It asks the controller instead (``serve.status()``), which
answers without touching the model: a deployment that autoscaling may take to zero replicas and
that has none running is resting by design: its target of zero is met (HEALTHY), its last
replica is draining (DOWNSCALING), or a request is waking it (UPSCALING). One that lost its
replicas is UNHEALTHY and still counts as down.
"""

from __future__ import annotations

from ray import serve

from .args import ModelArgs

RESTING_STATUSES = frozenset({"HEALTHY", "DOWNSCALING", "UPSCALING"})


def may_scale_to_zero(model: ModelArgs) -> bool:
    """Whether the model's deployment options let autoscaling remove its last replica."""
    autoscaling = model.deployment.get("autoscaling_config") or {}
    return autoscaling.get("min_replicas", 1) == 0


def scaled_to_zero(app_name: str, deployments: dict[str, str]) -> set[str]:
    """Names of the models, given as ``{model name: deployment name}``, that have no running
    replica by design (see the module docstring). Blocking: one call to the Serve controller."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return set()
    resting = set()
    for model, deployment in deployments.items():
        overview = app.deployments.get(deployment)
        if (
            overview is not None
            and overview.replica_states.get("RUNNING", 0) == 0
            and overview.status in RESTING_STATUSES
        ):
            resting.add(model)
    return resting
