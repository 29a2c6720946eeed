"""The committed Kubernetes manifests are the rendered ones, valid for Kubernetes, keep the admin key out, and
wire Triton to the online store's Redis (a persistent StatefulSet) through an optional Secret."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.parse
from contextlib import closing

import kubernetes_validate
import pytest
import redis
import tritonclient.grpc as grpcclient
import yaml

from backends.online_history import connect
from online_store.redis_server import free_port
from server.manifests import (
    ADMIN_SECRET_KEY,
    MANIFEST_DIR,
    REDIS_FILE,
    STORE_SECRET_FILE,
    TRITON_IMAGE,
    TRITON_VERSION,
    VARIANTS,
    WORKSPACE,
    K8sSpec,
    container_settings,
    render_variants,
)
from server.settings import ADMIN_KEY_ENV, ONLINE_STORE_URL_ENV, TritonSettings

#: Kubernetes version the manifests are validated for (schemas ship inside kubernetes-validate).
K8S_VERSION = "1.31"
KINDS = {**{name: ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"] for name in VARIANTS},
         REDIS_FILE: ["StatefulSet", "Service", "NetworkPolicy"], STORE_SECRET_FILE: ["Secret"]}


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


@pytest.mark.parametrize("name", sorted(KINDS))
def test_manifests_validate_offline_against_kubernetes_schemas(name, monkeypatch):
    def no_network(*args: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = list(yaml.safe_load_all((MANIFEST_DIR / name).read_text()))
    assert [d["kind"] for d in docs] == KINDS[name]
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
    monkeypatch.setenv(ONLINE_STORE_URL_ENV, "redis://elsewhere:1/0")
    assert render_variants() == {name: (MANIFEST_DIR / name).read_text() for name in KINDS}


def test_spec_rejects_unknown_fields():
    with pytest.raises(ValueError, match="replica"):
        K8sSpec(replica=3)


def _redis() -> tuple[dict, dict, dict]:
    """The Redis container, its pod's StatefulSet and its Service."""
    docs = _docs(REDIS_FILE)
    (container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return container, docs["StatefulSet"], docs["Service"]


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_example_secrets_url_is_the_redis_service():
    container, statefulset, service = _redis()
    (secret,) = _docs(STORE_SECRET_FILE).values()
    (url,) = secret["stringData"].values()
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.hostname) == ("redis", service["metadata"]["name"])
    (port,) = service["spec"]["ports"]
    assert parts.port == port["port"] == int(_flag(container["args"], "--port"))
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] == parts.port
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


def test_redis_keeps_its_aof_everysec_on_the_claim_mounted_at_its_dir():
    container, statefulset, _ = _redis()
    args = container["args"]
    assert (_flag(args, "--appendonly"), _flag(args, "--appendfsync")) == ("yes", "everysec")
    assert _flag(args, "--maxmemory-policy") == "noeviction"  # full: writes fail, no entity's state is dropped
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounted[claim["metadata"]["name"]] == _flag(args, "--dir")
    assert statefulset["spec"]["replicas"] == 1  # one writer per AOF
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                                           "whenScaled": "Retain"}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_the_manifests_redis_args_start_a_real_redis_server_with_that_persistence(tmp_path):
    container, _, _ = _redis()
    args = container["args"]
    port = free_port()
    local = [*args, "--bind", "127.0.0.1"]  # later flags win: a free local port and a temporary --dir
    local[local.index("--port") + 1], local[local.index("--dir") + 1] = str(port), str(tmp_path)
    process = subprocess.Popen([shutil.which("redis-server"), *local], stdout=subprocess.DEVNULL)
    client = connect(f"redis://127.0.0.1:{port}/0", timeout_s=1, retries=0)
    try:
        deadline = time.monotonic() + 15
        while not _answers(client):
            assert process.poll() is None and time.monotonic() < deadline, f"redis-server {local} did not start"
            time.sleep(0.05)
        config = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "save", "dir", "maxmemory-policy")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "save": "", "dir": str(tmp_path),
                          "maxmemory-policy": "noeviction"}
        client.set("written-before-shutdown", "1")
        client.shutdown()
        assert process.wait(10) == 0
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)
    aof = b"".join(p.read_bytes() for p in (tmp_path / "appendonlydir").glob("*.aof"))
    assert b"written-before-shutdown" in aof


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_triton_pod_reads_the_store_url_from_the_optional_secret(name):
    (secret,) = _docs(STORE_SECRET_FILE).values()
    triton = _triton(_docs(name)["Deployment"])
    (env,) = [e for e in triton["env"] if e["name"] == ONLINE_STORE_URL_ENV]
    (key,) = secret["stringData"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key, "optional": True}
    assert VARIANTS[name].online_store_secret == secret["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_network_policy_admits_the_triton_pods_to_redis(name):
    docs = _docs(REDIS_FILE)
    policy, redis_pod = docs["NetworkPolicy"]["spec"], docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pod.items()
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    triton_pod = _docs(name)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= triton_pod.items()
    assert [p["port"] for p in rule["ports"]] == [p["port"] for p in docs["Service"]["spec"]["ports"]]


@pytest.mark.triton
def test_ngc_image_matches_the_wheels_tritonserver(triton):
    with closing(grpcclient.InferenceServerClient(triton.settings.grpc_url)) as client:
        served = client.get_server_metadata().version
    assert served.startswith(f"{TRITON_VERSION}."), f"the wheel runs tritonserver {served}: update NGC_RELEASE"
