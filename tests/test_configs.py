"""The shipped Serve configs are valid Serve configs whose args validate as AppArgs."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.args import AppArgs

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_both_configs_exist():
    assert [p.name for p in CONFIGS] == ["serve-cpu.yaml", "serve.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds_the_way_serve_run_does(path):
    config = ServeDeploySchema(**yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "deployments.app:build_app"
    # Serve hands the builder the YAML args as a dict and validates them against its annotation.
    app = call_user_app_builder_with_args_if_necessary(build_app, application.args)
    assert isinstance(app, Application)
    assert AppArgs(**application.args).models[0].source == "qwen3-reranker-0.6b"


def test_serve_rejects_bad_args_through_the_builder_annotation():
    with pytest.raises(ValidationError, match="max_lenght"):
        call_user_app_builder_with_args_if_necessary(build_app, {"models": [{"name": "m", "source": "x", "max_lenght": 1}]})


def test_production_config_is_gpu_bf16_with_autoscaling():
    args = AppArgs(**yaml.safe_load((CONFIGS[1]).read_text())["applications"][0]["args"])
    model = args.models[0]
    assert (model.device, model.dtype) == ("cuda", "bfloat16")
    assert model.deployment["ray_actor_options"]["num_gpus"] == 1
    scaling = model.deployment["autoscaling_config"]
    assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"]
    # Batches are formed from calls in flight: the cap on them must not cap the batch.
    assert model.deployment["max_ongoing_requests"] >= model.batching.max_batch_size


def test_unknown_arg_is_rejected():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        AppArgs(models=[{"name": "m", "source": "x", "max_lenght": 5}])


def test_batch_size_below_chunk_size_is_rejected():
    with pytest.raises(ValueError, match="must be >= chunk_pairs"):
        AppArgs(models=[{"name": "m", "source": "x", "batching": {"max_batch_size": 4}}], chunk_pairs=8)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ingress_answers_its_own_overload(path):
    args = AppArgs(**yaml.safe_load(path.read_text())["applications"][0]["args"])
    assert args.ingress["max_ongoing_requests"] > args.max_concurrent_requests


def test_long_document_settings_and_their_bounds():
    args = AppArgs(models=[{"name": "m", "source": "x"}])
    assert (args.max_pairs, args.models[0].max_chunks_per_doc, args.models[0].chunk_overlap_tokens) == (4000, 1, 0)
    for model, match in [
        ({"max_chunks_per_doc": 0}, "max_chunks_per_doc"),
        ({"chunk_overlap_tokens": -1}, "chunk_overlap_tokens"),
        ({"max_length": 512, "chunk_overlap_tokens": 512}, "chunk_overlap_tokens must be below max_length"),
    ]:
        with pytest.raises(ValueError, match=match):
            AppArgs(models=[{"name": "m", "source": "x", **model}])
    with pytest.raises(ValueError, match="max_pairs"):
        AppArgs(models=[{"name": "m", "source": "x"}], max_pairs=0)


def test_engine_settings_that_cannot_run_are_refused_with_the_config():
    """Refused when the config is validated (as `serve run` builds the app), never when a replica starts."""
    path = next(p for p in CONFIGS if p.name == "serve-cpu.yaml")
    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    args["models"][0].update(packing=False, compile_layers=True)
    with pytest.raises(ValidationError, match="model 'qwen3-reranker-0.6b': compile_layers needs packed passes"):
        AppArgs(**args)
