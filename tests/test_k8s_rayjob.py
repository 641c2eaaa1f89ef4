"""k8s/rayjob.yaml: the `rerank batch` RayJob is valid and agrees with the RayService and the CLI.

KubeRay's RayJob CRD is not in the shared folder (only the RayService CRD is), so the RayJob is
checked in parts: its ``rayClusterSpec`` against the RayService CRD's ``rayClusterConfig`` schema
(both are KubeRay's ``RayClusterSpec`` type), its pod templates and the volume claim against the
Kubernetes schemas, its other ``spec`` fields against the RayJob API's names and types listed
below, and its entrypoint with the ``rerank`` parser itself.
"""

from __future__ import annotations

import copy
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rerank_cli.main import build_parser
from tests.test_k8s import K8S, KUBERNETES_VERSION, _env, _one, _ray_container, rayservice_schema

# RayJob `spec` fields used here, with their types (KubeRay v1 API, ray.io/v1 RayJobSpec).
RAYJOB_SPEC_FIELDS = {
    "entrypoint": str,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int,
    "rayClusterSpec": dict,
}


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one(K8S / "rayjob.yaml", "RayJob")


@pytest.fixture(scope="module")
def data_claim() -> dict:
    return _one(K8S / "rayjob.yaml", "PersistentVolumeClaim")


@pytest.fixture(scope="module")
def rayservice_cluster() -> dict:
    return _one(K8S / "rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def cluster_schema() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(rayservice_schema()["properties"]["spec"]["properties"]["rayClusterConfig"])


@pytest.fixture(scope="module")
def groups(rayjob) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


@pytest.fixture(scope="module")
def entrypoint(rayjob):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] == "rerank"
    return build_parser().parse_args(words[1:])


def test_the_cluster_spec_validates_against_kuberays_cluster_schema(rayjob, cluster_schema):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in cluster_schema.iter_errors(cluster)]
    assert errors == []
    broken = copy.deepcopy(cluster)
    del broken["workerGroupSpecs"][0]["maxReplicas"]
    assert any("'maxReplicas' is a required property" in e.message for e in cluster_schema.iter_errors(broken))


def test_the_other_spec_fields_are_rayjob_fields(rayjob):
    spec = rayjob["spec"]
    assert set(spec) <= set(RAYJOB_SPEC_FIELDS), set(spec) - set(RAYJOB_SPEC_FIELDS)
    for name, value in spec.items():
        assert isinstance(value, RAYJOB_SPEC_FIELDS[name]), name
    # The cluster is deleted with the job; the object stays to read its status.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_pod_templates_and_the_claim_are_valid(groups, data_claim):
    assert set(groups) == {"head", "gpu"}
    for name, group in groups.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"qwen3-reranker-batch-{name}"},
               "spec": group["template"]["spec"]}
        assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    assert kubernetes_validate.validate(data_claim, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    assert data_claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod reads and writes /data


def test_the_entrypoint_is_a_batch_run_with_one_actor_per_gpu(entrypoint, groups):
    assert entrypoint.command == "batch"
    gpu = groups["gpu"]
    gpus_per_pod = int(_ray_container(gpu)["resources"]["limits"]["nvidia.com/gpu"])
    assert (entrypoint.num_gpus, gpus_per_pod) == (1, 1)
    assert entrypoint.concurrency == gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]
    assert entrypoint.num_cpus + 1 <= int(_ray_container(gpu)["resources"]["limits"]["cpu"])  # room to tokenize
    assert (entrypoint.device, entrypoint.dtype) == ("cuda", "bfloat16")
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    assert not entrypoint.overwrite


def test_input_and_output_are_on_the_data_volume_in_every_pod(entrypoint, groups, data_claim):
    for name, group in groups.items():
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in _ray_container(group)["volumeMounts"]}
        data = mounts["/data"]
        assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == data_claim["metadata"]["name"], name
        assert not data.get("readOnly"), name
    for path in (*entrypoint.input, entrypoint.output):
        assert path.startswith("/data/"), path


def test_the_cluster_matches_the_rayservices_image_cache_and_model(rayjob, groups, entrypoint, rayservice_cluster):
    served = rayservice_cluster["workerGroupSpecs"]
    served_gpu = next(g for g in served if g["groupName"] == "gpu")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == rayservice_cluster["rayVersion"]
    for group in groups.values():
        assert _ray_container(group)["image"] == _ray_container(served_gpu)["image"]
        env = {n: e["value"] for n, e in _env(_ray_container(group)).items()}
        served_env = {n: e["value"] for n, e in _env(_ray_container(served_gpu)).items() if "value" in e}
        assert env == served_env  # the same read-only model cache, hub and offline mode
    serve_config = yaml.safe_load(_one(K8S / "rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    assert entrypoint.model == serve_config["applications"][0]["args"]["models"][0]["source"]


def test_k8s_readme_shows_the_job(rayjob):
    readme = (K8S / "README.md").read_text()
    for text in ("kubectl apply -f k8s/rayjob.yaml", rayjob["metadata"]["name"], "ray job submit", "rerank batch"):
        assert text in readme, text
