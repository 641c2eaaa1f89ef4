"""The Kubernetes manifests in k8s/ are valid and agree with the Serve config, the image and the code.

No cluster is needed: the RayService is validated against KubeRay's CRD schema (the v1
``openAPIV3Schema`` of KubeRay v1.7.0, kept in ``tests/data/``), pod templates, the PVC and the
Job against the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate``.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.args import AppArgs

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# KubeRay v1.7.0's RayService CRD, only its v1 openAPIV3Schema, as gzipped JSON (tests/data/README.md).
CRD_SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "kuberay-v1.7.0-rayservice-v1-schema.json.gz"
# The oldest Kubernetes minor the pod templates must be valid for (schemas bundled offline).
KUBERNETES_VERSION = "1.33"
# Serve's default when a deployment sets no graceful_shutdown_timeout_s.
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S = 20


# libyaml when present: faster than the pure-Python loader.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def _one(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _one(K8S / "rayservice.yaml", "RayService")


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def production_config() -> dict:
    return yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())


@pytest.fixture(scope="module")
def app_args(serve_config) -> AppArgs:
    (application,) = serve_config["applications"]
    return AppArgs(**application["args"])


@pytest.fixture(scope="module")
def cluster(rayservice) -> dict:
    return rayservice["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def groups(cluster) -> dict[str, dict]:
    """Head and worker groups by name; the head is ``"head"``."""
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


@pytest.fixture(scope="module")
def gpu_group(cluster) -> dict:
    (group,) = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in _ray_container(g)["resources"]["limits"]]
    return group


@pytest.fixture(scope="module")
def pvc() -> dict:
    return _one(K8S / "model-cache-pvc.yaml", "PersistentVolumeClaim")


@pytest.fixture(scope="module")
def job() -> dict:
    return _one(K8S / "download-job.yaml", "Job")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def _ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of a group's pod template.
    return group["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _arg_default(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(.*)$", dockerfile, re.MULTILINE)
    assert match, f"k8s/Dockerfile has no `ARG {name}=...`"
    return match.group(1).strip().strip('"')


def _deployments(args: AppArgs) -> dict[str, dict]:
    """Serve options of every deployment the application creates."""
    return {"ingress": args.ingress, **{m.name: m.deployment for m in args.models}}


def _prestop_sleep_s(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    match = re.fullmatch(r"sleep (\d+)", command[-1]) if command[:2] == ["/bin/sh", "-c"] else None
    assert match, f"preStop is not `/bin/sh -c 'sleep N'`: {command}"
    return int(match.group(1))


# The RayService against KubeRay's schema ------------------------------------------------------


def rayservice_schema() -> dict:
    """The RayService v1 openAPIV3Schema kept in the repository."""
    return json.loads(gzip.decompress(CRD_SCHEMA_PATH.read_bytes()))


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(rayservice_schema())


def test_rayservice_validates_against_the_kuberay_crd(rayservice, crd_validator):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    assert rayservice["metadata"]["name"] == "qwen3-reranker"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(rayservice)]
    assert errors == []


def test_crd_validation_catches_a_missing_max_replicas(rayservice, crd_validator):
    broken = copy.deepcopy(rayservice)
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]
    assert any("'maxReplicas' is a required property" in e.message for e in crd_validator.iter_errors(broken))


# serveConfigV2 is the production Serve config ---------------------------------------------------


def test_serve_config_parses_and_its_import_path_resolves(serve_config):
    schema = ServeDeploySchema(**serve_config)
    (application,) = schema.applications
    module, _, attr = application.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_app


def test_applications_equal_configs_serve_yaml(serve_config, production_config):
    assert serve_config["applications"] == production_config["applications"]
    assert serve_config["applications"][0]["name"] == "reranker"


def test_http_port_is_the_head_serve_port(serve_config, production_config, groups):
    port = serve_config["http_options"]["port"]
    assert port == production_config["http_options"]["port"] == 8000
    assert {p["name"]: p["containerPort"] for p in _ray_container(groups["head"])["ports"]}["serve"] == port


def test_args_validate_and_build(app_args):
    assert app_args.models[0].source == "qwen3-reranker-0.6b"
    assert (app_args.models[0].device, app_args.models[0].dtype) == ("cuda", "bfloat16")
    assert app_args.api_keys_env == "RERANK_API_KEYS"
    build_app(app_args)  # Serve accepts every deployment option


# Kubernetes objects --------------------------------------------------------------------------


def test_pod_templates_are_valid_pods(groups):
    assert set(groups) == {"head", "cpu-ingress", "gpu"}
    for name, group in groups.items():
        template = group["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"qwen3-reranker-{name}", **template.get("metadata", {})},
            "spec": template["spec"],
        }
        assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_pod_validation_catches_a_misspelled_field(groups):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": copy.deepcopy(groups["gpu"]["template"]["spec"])}
    pod["spec"]["containers"][0]["resource"] = pod["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_pvc_and_download_job_are_valid(pvc, job):
    for doc in (pvc, job):
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    # Pods on several nodes read it while the Job writes.
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# Ray version and image -----------------------------------------------------------------------


def test_ray_version_matches_the_image_and_installed_ray(cluster, dockerfile):
    assert cluster["rayVersion"] == _arg_default(dockerfile, "RAY_VERSION") == ray.__version__ == "2.60.0"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", dockerfile, re.MULTILINE)
    assert _arg_default(dockerfile, "PYTHON_TAG") == "py311"
    assert _arg_default(dockerfile, "PRELOAD_MODEL") == ""


def test_every_pod_runs_the_one_serving_image(groups, job):
    images = {_ray_container(g)["image"] for g in groups.values()}
    images |= {c["image"] for c in job["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/qwen3-rerank-serve:0.1.0"}


# Scheduling and scaling ----------------------------------------------------------------------


def test_autoscaling_is_in_tree(cluster):
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60


def test_head_takes_no_replica(groups, app_args):
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in _ray_container(groups["head"])["resources"]["limits"]
    # Every deployment asks for CPUs, so none fits on a head that has none.
    for name, options in _deployments(app_args).items():
        assert options["ray_actor_options"]["num_cpus"] >= 1, name


def test_gpu_group_holds_every_model_replica(gpu_group, app_args):
    (model,) = app_args.models
    limits = _ray_container(gpu_group)["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert gpus_per_pod == 1 == model.deployment["ray_actor_options"]["num_gpus"]
    assert 1 <= gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"] == 4
    scaling = model.deployment["autoscaling_config"]
    actor = model.deployment["ray_actor_options"]
    # The autoscaler can add pods for Serve's largest replica count, and keeps one per minimum replica.
    assert gpu_group["maxReplicas"] * gpus_per_pod >= scaling["max_replicas"] * actor["num_gpus"]
    assert gpu_group["minReplicas"] * gpus_per_pod >= scaling["min_replicas"]
    # Host memory for a 0.6B bf16 model, torch and the object store; CPUs for the replica.
    assert limits["memory"] == "16Gi" and int(limits["cpu"]) >= actor["num_cpus"]
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in gpu_group["template"]["spec"]["tolerations"]


def test_cpu_group_fits_the_ingress(groups, app_args):
    group = groups["cpu-ingress"]
    limits = _ray_container(group)["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    ingress = app_args.ingress
    cpus = ingress["ray_actor_options"]["num_cpus"]
    assert int(limits["cpu"]) >= cpus
    assert group["maxReplicas"] * int(limits["cpu"]) >= ingress["autoscaling_config"]["max_replicas"] * cpus
    assert group["minReplicas"] >= 1


# Draining ------------------------------------------------------------------------------------


def test_prestop_outlasts_serve_graceful_shutdown(groups, app_args):
    timeouts = {name: o.get("graceful_shutdown_timeout_s", SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S)
                for name, o in _deployments(app_args).items()}
    assert timeouts["qwen3-reranker-0.6b"] == 30
    for name, group in groups.items():
        sleep_s = _prestop_sleep_s(_ray_container(group))
        grace_s = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert max(timeouts.values()) < sleep_s < grace_s, name
    gpu = groups["gpu"]
    assert (_prestop_sleep_s(_ray_container(gpu)), gpu["template"]["spec"]["terminationGracePeriodSeconds"]) == (40, 60)


# Model cache, hub and API keys ---------------------------------------------------------------


def _mounted_claims(pod_spec: dict, container: dict) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claimName, read-only) of the container's PVC mounts."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    claims = {}
    for mount in container.get("volumeMounts", []):
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        if claim:
            claims[mount["mountPath"]] = (claim["claimName"], bool(mount.get("readOnly")))
    return claims


def test_every_ray_pod_reads_the_model_cache_where_rerank_cache_dir_points(groups, pvc):
    for name, group in groups.items():
        container = _ray_container(group)
        cache_dir = _env(container)["RERANK_CACHE_DIR"]["value"]
        assert cache_dir == "/models"
        assert _mounted_claims(group["template"]["spec"], container)[cache_dir] == (pvc["metadata"]["name"], True), name


def test_download_job_fills_that_claim_with_the_served_model(job, pvc, groups, app_args):
    from rerank_cli.main import build_parser

    pod_spec = job["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["command"][0] == "rerank"
    args = build_parser().parse_args(container["command"][1:])
    assert (args.command, args.model) == ("download", app_args.models[0].source)
    assert _mounted_claims(pod_spec, container)[args.cache_dir] == (pvc["metadata"]["name"], False)
    # Serving pods read the cache with the hub that wrote it (the layouts differ), offline.
    for name, group in groups.items():
        env = _env(_ray_container(group))
        hub_env = (env["RERANK_HUB"]["value"], env["HF_HUB_OFFLINE"]["value"])
        assert hub_env == (args.hub, "1") == ("huggingface", "1"), name


def test_image_defaults_agree_with_the_pods(dockerfile, groups):
    env = _env(_ray_container(groups["gpu"]))
    assert _arg_default(dockerfile, "MODEL_HUB") == env["RERANK_HUB"]["value"]
    assert re.search(r"^ENV RERANK_CACHE_DIR=/models\b", dockerfile, re.MULTILINE)
    assert env["RERANK_CACHE_DIR"]["value"] == "/models"
    assert 'rerank download "$PRELOAD_MODEL" --hub "$MODEL_HUB" --cache-dir /models' in dockerfile


def test_a_pod_finds_the_downloaded_model_offline_writing_nothing(tmp_path, groups, app_args):
    """With a pod's environment, the app's model source resolves to the cached snapshot of a
    read-only cache (the layout `rerank download --hub huggingface` writes), without network."""
    from huggingface_hub.file_download import repo_folder_name

    from rerank_core.registry import resolve_hub_id

    source = app_args.models[0].source
    revision = "0" * 40
    repo = tmp_path / repo_folder_name(repo_id=resolve_hub_id(source), repo_type="model")
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    pod_env = {n: e["value"] for n, e in _env(_ray_container(groups["gpu"])).items() if "value" in e}
    env = {**os.environ, **pod_env, "RERANK_CACHE_DIR": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    # rerank_core.registry imports nothing of its package: loaded alone, it spares the subprocess torch.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('rerank_core.registry', sys.argv[1])\n"
        "registry = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(registry)\n"
        "print(registry.resolve_source(sys.argv[2]))\n"
    )
    paths = [tmp_path, *tmp_path.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~0o222)  # as mounted: read-only (root ignores it; see below)
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(REPO / "rerank_core" / "registry.py"), source],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | 0o200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()) == snapshot
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_api_keys_come_from_an_optional_secret(groups, app_args):
    for name, group in groups.items():
        ref = _env(_ray_container(group))[app_args.api_keys_env]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "qwen3-reranker-api-keys", "key": "api-keys", "optional": True}, name


def test_readme_names_the_objects_the_manifests_create(rayservice, pvc, job):
    readme = (K8S / "README.md").read_text()
    for text in (f"{rayservice['metadata']['name']}-serve-svc", pvc["metadata"]["name"], job["metadata"]["name"],
                 "qwen3-reranker-api-keys", "--version 1.7.0", "docker build -f k8s/Dockerfile"):
        assert text in readme, text


# Upgrades --------------------------------------------------------------------------------------

# RayService upgrade strategies of KubeRay 1.7 that keep serving while a new cluster comes up
# ("None" leaves the old cluster in place; the CRD types the field as a plain string).
ZERO_DOWNTIME_UPGRADES = {"NewCluster", "NewClusterWithIncrementalUpgrade"}


def _unknown_fields(value, schema: dict, path: str = ""):
    """Paths in ``value`` that ``schema`` does not declare. The API server prunes such fields
    silently (structural schemas), and jsonschema validation alone lets them through."""
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                yield from _unknown_fields(item, schema["properties"][key], f"{path}/{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                yield f"{path}/{key}"
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from _unknown_fields(item, schema["additionalProperties"], f"{path}/{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], f"{path}/{i}")


def test_the_operator_knows_every_rayservice_field(rayservice, crd_validator):
    assert list(_unknown_fields(rayservice, crd_validator.schema)) == []


def test_unknown_field_check_catches_a_misspelled_upgrade_field(rayservice, crd_validator):
    broken = copy.deepcopy(rayservice)
    broken["spec"]["upgradeStrategy"]["typ"] = broken["spec"]["upgradeStrategy"].pop("type")
    broken["spec"]["rayClusterDeletionDelaySecond"] = broken["spec"].pop("rayClusterDeletionDelaySeconds")
    assert crd_validator.is_valid(broken)  # what schema validation alone misses
    assert list(_unknown_fields(broken, crd_validator.schema)) == [
        "/spec/upgradeStrategy/typ", "/spec/rayClusterDeletionDelaySecond"
    ]


def test_cluster_upgrades_are_zero_downtime_without_extra_setup(rayservice, crd_validator):
    strategy = rayservice["spec"]["upgradeStrategy"]
    assert strategy["type"] in ZERO_DOWNTIME_UPGRADES
    # NewCluster: GA, nothing else to install. The incremental strategy would need its required
    # clusterUpgradeOptions, the operator's RayServiceIncrementalUpgrade feature gate and a
    # Gateway API controller, none of which k8s/README.md sets up.
    assert strategy == {"type": "NewCluster"}
    spec = crd_validator.schema["properties"]["spec"]["properties"]
    assert set(spec["upgradeStrategy"]["properties"]) >= {"type", "clusterUpgradeOptions"}


def test_old_cluster_outlives_the_requests_it_holds(rayservice, serve_config, app_args):
    """After the switch, the old cluster is deleted only once every request it accepted has been
    answered or timed out at its proxy (and each pod then still drains in its preStop)."""
    proxy_timeout_s = serve_config["http_options"]["request_timeout_s"]
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= proxy_timeout_s > app_args.request_timeout_s
