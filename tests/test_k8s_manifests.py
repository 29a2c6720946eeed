"""The committed Kubernetes manifests are the rendered ones, valid for Kubernetes, and keep the admin key out."""

from __future__ import annotations

import socket
from contextlib import closing

import kubernetes_validate
import pytest
import tritonclient.grpc as grpcclient
import yaml

from server.manifests import (
    ADMIN_SECRET_KEY,
    MANIFEST_DIR,
    TRITON_IMAGE,
    TRITON_VERSION,
    VARIANTS,
    WORKSPACE,
    K8sSpec,
    container_settings,
    render_variants,
)
from server.settings import ADMIN_KEY_ENV, TritonSettings

#: Kubernetes version the manifests are validated for (schemas ship inside kubernetes-validate).
K8S_VERSION = "1.31"
KINDS = ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]


def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((MANIFEST_DIR / name).read_text())}


def _triton(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_committed_manifests_are_the_rendered_ones():
    rendered = render_variants()
    assert sorted(p.name for p in MANIFEST_DIR.glob("*.yaml")) == sorted(rendered)
    for name, text in rendered.items():
        assert (MANIFEST_DIR / name).read_text() == text, (
            f"server/k8s/{name} is stale: run `python -m server.manifests` and commit the result"
        )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_manifests_validate_offline_against_kubernetes_schemas(name, monkeypatch):
    def no_network(*args: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = list(yaml.safe_load_all((MANIFEST_DIR / name).read_text()))
    assert [d["kind"] for d in docs] == KINDS
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_a_misspelt_field_fails_validation():
    deployment = _docs("triton-cpu.yaml")["Deployment"]
    _triton(deployment)["livenessprobe"] = _triton(deployment).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessprobe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_container_args_come_from_triton_settings(name):
    spec = VARIANTS[name]
    triton = _triton(_docs(name)["Deployment"])
    assert triton["image"] == TRITON_IMAGE and triton["command"] == ["tritonserver"]
    assert triton["args"] == container_settings(spec, TritonSettings.model_construct()).to_args()
    repository = spec.s3_uri if spec.repository == "s3" else WORKSPACE / "model_repository"
    assert f"--model-repository={repository}" in triton["args"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_admin_key_comes_from_a_secret_and_is_never_inline(name):
    triton = _triton(_docs(name)["Deployment"])
    (env,) = [e for e in triton["env"] if e["name"] == ADMIN_KEY_ENV]
    assert env["valueFrom"]["secretKeyRef"] == {"name": VARIANTS[name].admin_secret, "key": ADMIN_SECRET_KEY}
    restricted = [a for a in triton["args"] if "restricted" in a]
    assert len(restricted) == 2 and all(a.endswith(f"=$({ADMIN_KEY_ENV})") for a in restricted)
    assert all("model-repository" in a and "health" not in a and "inference" not in a for a in restricted)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_probes_ports_and_disruption_budget(name):
    docs = _docs(name)
    triton = _triton(docs["Deployment"])
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert {p["port"] for p in docs["Service"]["spec"]["ports"]} == {8000, 8001, 8002}
    selector = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert {"cpu", "memory"} <= triton["resources"]["requests"].keys() <= triton["resources"]["limits"].keys()


def test_gpu_variant_requests_a_gpu_and_gpu_instances():
    pod = _docs("triton-gpu.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (sync,) = pod["initContainers"]
    assert sync["args"][-2:] == ["--instance-kind", "gpu"]
    assert "--allow-gpu-metrics=true" in pod["containers"][0]["args"]
    cpu = _docs("triton-cpu.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


def test_init_container_syncs_the_registry_into_the_shared_empty_dir():
    pod = _docs("triton-cpu.yaml")["Deployment"]["spec"]["template"]["spec"]
    (sync,) = pod["initContainers"]
    assert sync["command"] == ["treeops"] and sync["args"][0] == "sync"
    assert {"name": "workspace", "emptyDir": {}} in pod["volumes"]
    mounted = {m["name"]: m["mountPath"] for m in sync["volumeMounts"]}
    assert mounted["workspace"] == str(WORKSPACE)
    assert {"name": "workspace", "mountPath": str(WORKSPACE), "readOnly": True} in pod["containers"][0]["volumeMounts"]
    s3 = _docs("triton-s3.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in s3


def test_rendering_ignores_the_local_environment(monkeypatch):
    monkeypatch.setenv("TREEOPS_TRITON_LOG_VERBOSE", "3")
    monkeypatch.setenv(ADMIN_KEY_ENV, "a-real-key-that-must-not-leak")
    assert render_variants() == {name: (MANIFEST_DIR / name).read_text() for name in VARIANTS}


def test_spec_rejects_unknown_fields():
    with pytest.raises(ValueError, match="replica"):
        K8sSpec(replica=3)


@pytest.mark.triton
def test_ngc_image_matches_the_wheels_tritonserver(triton):
    with closing(grpcclient.InferenceServerClient(triton.settings.grpc_url)) as client:
        served = client.get_server_metadata().version
    assert served.startswith(f"{TRITON_VERSION}."), f"the wheel runs tritonserver {served}: update NGC_RELEASE"
