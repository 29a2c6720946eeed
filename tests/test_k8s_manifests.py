"""The committed Kubernetes manifests are the rendered ones, valid for Kubernetes, keep the admin key out, and
wire Triton to the online store's Redis (a persistent StatefulSet) through an optional Secret, and to the monitoring:
the prediction log on the claim the `treeops monitor` CronJob reads, gauges pushed to a (real) Pushgateway, scrape
objects, and the alert rules and dashboard as ConfigMaps equal to the committed files; and the `treeops loop --once`
CronJob: a command line the real CLI accepts, on the claim whose model repository its one Triton serves."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path

import kubernetes_validate
import pytest
import redis
import tritonclient.grpc as grpcclient
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer._click.exceptions import NoSuchOption  # typer vendors click; its errors live here (as in treeops.cli)

from backends.online_history import connect
from bench.monitor import run_monitor_benchmark
from monitoring.alert_rules import ALERTS_DIR, RULES_FILE
from monitoring.dashboard import DASHBOARD_FILE
from monitoring.metric_names import MONITOR_DRIFT_SHARE, MONITOR_QUALITY
from monitoring.monitor import PUSH_JOB, GaugePushError, MonitorSettings, push_gauges
from online_store.redis_server import free_port
from retraining.loop import LOCK_FILE
from server.manifests import (
    ADMIN_SECRET_KEY,
    CLAIM_TRITON_FILE,
    LOOP,
    LOOP_FILE,
    MANIFEST_DIR,
    MONITOR,
    MONITOR_ROOT,
    MONITORING_CONFIG_FILE,
    MONITORING_FILE,
    OPERATOR_FILE,
    POD_LOG_DIR,
    PUSHGATEWAY_URL_ENV,
    REDIS_FILE,
    SHIP_INTERVAL_S,
    STORE_SECRET_FILE,
    TRITON_IMAGE,
    TRITON_VERSION,
    VARIANTS,
    VERDICT_EXIT_CODES,
    WORKSPACE,
    K8sSpec,
    LoopSpec,
    MonitorSpec,
    container_settings,
    render_loop,
    render_monitoring,
    render_variants,
)
from server.settings import ADMIN_KEY_ENV, ONLINE_STORE_URL_ENV, PREDICTION_LOG_DIR_ENV, TritonSettings
from treeops.cli import app
from treeops.errors import EXIT_NO_DATA
from treeops.workspace import Workspace

#: Kubernetes version the manifests are validated for (schemas ship inside kubernetes-validate).
K8S_VERSION = "1.31"
KINDS = {**{name: ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"] for name in VARIANTS},
         CLAIM_TRITON_FILE: ["Deployment", "Service"], LOOP_FILE: ["CronJob"],
         REDIS_FILE: ["StatefulSet", "Service", "NetworkPolicy"], STORE_SECRET_FILE: ["Secret"],
         MONITORING_FILE: ["PersistentVolumeClaim", "CronJob", "Deployment", "Service"],
         MONITORING_CONFIG_FILE: ["ConfigMap", "ConfigMap"],
         OPERATOR_FILE: ["ServiceMonitor", "ServiceMonitor", "PrometheusRule"]}
#: Prometheus Operator custom resources: no schema ships in kubernetes-validate; checked field by field below.
OPERATOR_API = "monitoring.coreos.com/v1"


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
        if doc["apiVersion"] != OPERATOR_API:
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
    repository = {"s3": spec.s3_uri, "claim": MONITOR_ROOT / "model_repository"}.get(spec.repository,
                                                                                      WORKSPACE / "model_repository")
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
    assert {"cpu", "memory"} <= triton["resources"]["requests"].keys() <= triton["resources"]["limits"].keys()
    if VARIANTS[name].repository == "claim":  # one pod: a budget of one available would block every node drain
        assert docs["Deployment"]["spec"]["replicas"] == 1 and docs.keys() == {"Deployment", "Service"}
        return
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


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
    assert [c["name"] for c in s3["initContainers"]] == ["ship-prediction-log"]  # Triton reads the repository itself


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


def _monitoring() -> tuple[dict, dict, dict]:
    """The monitoring claim, the monitor CronJob's pod spec and its `monitor` container."""
    docs = _docs(MONITORING_FILE)
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return docs["PersistentVolumeClaim"], pod, container


def _mounted_claims(pod: dict, container: dict) -> dict[str, str]:
    """Claim name -> where `container` mounts it."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    return {claims[m["name"]]: m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}


@pytest.mark.parametrize("name", sorted(n for n, v in VARIANTS.items() if v.prediction_log_s3 is None))
def test_triton_pods_log_predictions_onto_the_claim_the_monitor_reads(name):
    claim, job_pod, monitor = _monitoring()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every Triton replica writes while the job reads
    pod = _docs(name)["Deployment"]["spec"]["template"]["spec"]
    triton = _triton(_docs(name)["Deployment"])
    env = {e["name"]: e.get("value") for e in triton["env"]}
    settings = container_settings(VARIANTS[name], TritonSettings.model_construct())
    assert {k: env[k] for k in settings.prediction_log_environment()} == settings.prediction_log_environment()
    log_dir = Path(env[PREDICTION_LOG_DIR_ENV])
    mounted = _mounted_claims(pod, triton)
    assert log_dir.is_relative_to(mounted[claim["metadata"]["name"]]), (log_dir, mounted)
    # the job's workspace is the claim, and its log root (the default <workspace>/prediction_log) is that folder
    command = monitor["command"][-1]
    workspace = Path(_flag(command.split(), "--workspace"))
    assert workspace == Path(_mounted_claims(job_pod, monitor)[claim["metadata"]["name"]]) == MONITOR_ROOT
    assert log_dir == workspace / "prediction_log" and "--log-root" not in command
    (sync,) = job_pod["initContainers"]  # each logged version's reference comes with its synced folder
    assert sync["args"][:1] == ["sync"] and _flag(sync["args"], "--workspace") == str(workspace)
    assert {"cpu", "memory"} <= monitor["resources"]["limits"].keys()
    for security in (pod["securityContext"], job_pod["securityContext"]):
        assert (security["runAsUser"], security["fsGroup"]) == (1000, 1000)  # the same owner of the log's files


def _cli_params(args: list[str]) -> dict:
    """`treeops <args>` parsed by the real CLI (typer; sub-apps such as `log ship` included), without running it."""
    command, args = typer.main.get_command(app), list(args)
    while hasattr(command, "commands"):
        command = command.commands[args.pop(0)]
    with command.make_context(command.name, args) as ctx:
        return ctx.params


def test_the_s3_variant_ships_each_pods_log_with_a_sidecar_that_stops_after_triton():
    spec = VARIANTS["triton-s3.yaml"]
    pod = _docs("triton-s3.yaml")["Deployment"]["spec"]["template"]["spec"]
    triton = _triton(_docs("triton-s3.yaml")["Deployment"])
    log_dir = Path({e["name"]: e.get("value") for e in triton["env"]}[PREDICTION_LOG_DIR_ENV])
    assert log_dir == POD_LOG_DIR
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]  # no shared claim: each pod its own log
    assert {"name": "prediction-log", "emptyDir": {}} in pod["volumes"]
    (ship,) = pod["initContainers"]
    assert ship["restartPolicy"] == "Always"  # a native sidecar: Kubernetes stops it after tritonserver
    for container, read_only in ((triton, False), (ship, True)):
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "prediction-log"]
        assert log_dir.is_relative_to(mount["mountPath"]) and mount.get("readOnly", False) is read_only
    assert ship["command"] == ["treeops"]
    params = _cli_params(ship["args"])
    assert (params["to"], params["log_root"], params["once"]) == (spec.prediction_log_s3, log_dir, False)
    assert params["interval_s"] == SHIP_INTERVAL_S
    assert ship["envFrom"] == [{"secretRef": {"name": spec.storage_secret, "optional": True}}]  # AWS_* credentials
    settings = container_settings(spec, TritonSettings.model_construct())
    assert pod["terminationGracePeriodSeconds"] >= settings.exit_timeout_s + SHIP_INTERVAL_S  # room for its last pass


def test_the_monitor_reads_a_shipped_log_from_its_s3_prefix():
    uri = VARIANTS["triton-s3.yaml"].prediction_log_s3
    (monitor,) = render_monitoring(MonitorSpec(log_root=uri))[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"]
    command = shlex.split(monitor["command"][-1])
    assert command[:2] == ["exec", "treeops"]
    params = _cli_params(command[2:])
    assert params["log_root"] == uri and params["workspace"] == MONITOR_ROOT
    assert "--log-root" not in MONITOR.command()[-1]  # the committed CronJob reads the claim


def test_the_cronjob_runs_the_hourly_window_and_fails_without_retry_on_a_verdict():
    cronjob = _docs(MONITORING_FILE)["CronJob"]["spec"]
    _, pod, monitor = _monitoring()
    assert cronjob["schedule"] == "5 * * * *" and cronjob["timeZone"] == "Etc/UTC" and "--window 1h" in monitor[
        "command"][-1]
    assert cronjob["concurrencyPolicy"] == "Forbid" and pod["restartPolicy"] == "Never"
    (rule,) = cronjob["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"] == {
        "containerName": monitor["name"], "operator": "In", "values": list(VERDICT_EXIT_CODES)}


@pytest.mark.slow
def test_the_cronjobs_command_runs_treeops_monitor_on_the_hour_and_keeps_its_exit_code(tmp_path):
    """The container's `sh -c` command run as it is, with the venv's real `treeops` on PATH: with no log on the
    claim it exits 6 (a verdict: no retry) naming the window, which ends at the current hour."""
    _, _, monitor = _monitoring()
    assert not MONITOR_ROOT.exists(), f"{MONITOR_ROOT} exists here: this test expects no log there"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    hours = {dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)}
    done = subprocess.run(monitor["command"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    hours.add(dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0))
    assert done.returncode == EXIT_NO_DATA and EXIT_NO_DATA in VERDICT_EXIT_CODES, done.stderr
    assert f"{MONITOR_ROOT / 'prediction_log' / f'model={MONITOR.model_name}'}" in done.stderr
    assert any(f"from {(h - dt.timedelta(hours=1)).isoformat()} to {h.isoformat()}" in done.stderr for h in hours), (
        done.stderr)
    assert not MONITOR_ROOT.exists()


def test_the_cronjob_pushes_to_the_rendered_pushgateway(monkeypatch):
    _, _, monitor = _monitoring()
    docs = _docs(MONITORING_FILE)
    (env,) = [e for e in monitor["env"] if e["name"] == PUSHGATEWAY_URL_ENV]
    url = urllib.parse.urlsplit(env["value"])
    (port,) = docs["Service"]["spec"]["ports"]
    assert (url.hostname, url.port) == (docs["Service"]["metadata"]["name"], port["port"])
    gateway = docs["Deployment"]["spec"]["template"]
    assert docs["Service"]["spec"]["selector"].items() <= gateway["metadata"]["labels"].items()
    (container,) = gateway["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] == url.port
    monkeypatch.setenv(PUSHGATEWAY_URL_ENV, env["value"])  # the variable is the one MonitorSettings reads
    assert MonitorSettings().pushgateway_url == env["value"]


def test_the_config_maps_hold_the_committed_alert_rules_and_dashboard():
    maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all((MANIFEST_DIR / MONITORING_CONFIG_FILE).read_text())}
    rules = {p.name: p.read_text() for p in ALERTS_DIR.glob("*.yml")}
    assert rules and maps["treeops-alert-rules"]["data"] == rules
    assert maps["treeops-grafana-dashboard"]["data"] == {DASHBOARD_FILE.name: DASHBOARD_FILE.read_text()}
    assert maps["treeops-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    (rule,) = [d for d in yaml.safe_load_all((MANIFEST_DIR / OPERATOR_FILE).read_text()) if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == OPERATOR_API and rule["spec"] == {"groups": yaml.safe_load(RULES_FILE.read_text())[
        "groups"]}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prometheus_scrapes_tritons_metrics_port_by_annotation_or_service_monitor(name):
    docs = _docs(name)
    template = docs["Deployment"]["spec"]["template"]
    metrics = {p["name"]: p["containerPort"] for p in _triton(docs["Deployment"])["ports"]}["metrics"]
    assert metrics == 8002 and template["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                                                       "prometheus.io/port": str(metrics)}
    monitors = {d["metadata"]["name"]: d for d in yaml.safe_load_all((MANIFEST_DIR / OPERATOR_FILE).read_text())
                if d["kind"] == "ServiceMonitor"}
    triton = monitors["treeops-triton"]
    assert triton["apiVersion"] == OPERATOR_API
    assert triton["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    (endpoint,) = triton["spec"]["endpoints"]
    assert {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}[endpoint["port"]] == metrics
    gateway_service = _docs(MONITORING_FILE)["Service"]
    pushed = monitors[gateway_service["metadata"]["name"]]
    assert pushed["spec"]["selector"]["matchLabels"].items() <= gateway_service["metadata"]["labels"].items()
    (endpoint,) = pushed["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True  # keeps job="treeops_monitor" and the pushed model/version labels
    assert endpoint["port"] in {p["name"] for p in gateway_service["spec"]["ports"]}


class LocalPushgateway:
    """Debian's real `prometheus-pushgateway` on a free loopback port (the release the manifest's image runs)."""

    def __init__(self) -> None:
        binary = shutil.which("prometheus-pushgateway")
        if binary is None:
            pytest.fail("prometheus-pushgateway is not on PATH: install Debian's prometheus-pushgateway "
                        "(`make test` does it; by hand: apt-get install -y prometheus-pushgateway)")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([binary, f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._ready():
            assert self.proc.poll() is None, f"prometheus-pushgateway exited: {self.proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"prometheus-pushgateway not ready on {self.url} after 30 s"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def samples(self, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Labels -> value of every sample of `metric` the gateway exposes."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == metric}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=10) == 0, "prometheus-pushgateway did not stop cleanly on SIGTERM"


@pytest.mark.slow
def test_the_monitor_jobs_gauges_reach_a_real_pushgateway(tmp_path, monkeypatch):
    """A monitor run with the CronJob's variable set (to a local Pushgateway) pushes its window's gauges."""
    gateway = LocalPushgateway()
    try:
        monkeypatch.setenv(PUSHGATEWAY_URL_ENV, gateway.url)
        run = run_monitor_benchmark(2000, tmp_path / "workspace", train_rows=5000)  # run_monitor as the CLI runs it
        window = json.loads((Path(run.folder) / "result.json").read_text())
        # the gateway adds instance="" (an empty label: none, once scraped with honorLabels)
        group = (("instance", ""), ("job", PUSH_JOB), ("model", window["model"]), ("version", str(window["version"])))
        assert gateway.samples(MONITOR_DRIFT_SHARE.name) == {group: pytest.approx(window["drift_share"])}
        (roc_auc,) = [c["value"] for c in window["quality"] if c["figure"] == "roc_auc"]
        assert gateway.samples(MONITOR_QUALITY.name)[tuple(sorted((*group, ("figure", "roc_auc"))))] == pytest.approx(roc_auc)
        pushed = gateway.samples("push_time_seconds")  # what an alert on a job that stopped pushing would use
        assert list(pushed) == [(("instance", ""), ("job", PUSH_JOB), ("model", window["model"]))]
        (pushed_at,) = pushed.values()
        assert time.time() - 120 < pushed_at <= time.time()
    finally:
        gateway.stop()
    with pytest.raises(GaugePushError, match=rf"Pushgateway {gateway.url} failed .*TREEOPS_MONITOR_PUSHGATEWAY_URL"):
        push_gauges(gateway.url, "fraud", [])  # the gateway is gone: the error names it and the variable


def _loop() -> tuple[dict, dict, dict]:
    """The loop CronJob's spec, its pod spec and its `loop` container."""
    cronjob = _docs(LOOP_FILE)["CronJob"]["spec"]
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return cronjob, pod, container


def _loop_params(container: dict) -> dict:
    """The container's command line parsed by the real `treeops` CLI (typer), without running it."""
    assert container["command"] == ["treeops"]
    name, *args = container["args"]
    command = typer.main.get_command(app).commands[name]
    with command.make_context(name, args) as ctx:
        return ctx.params


def test_the_loop_cronjobs_command_line_is_one_treeops_loop_once_accepts():
    _, _, loop = _loop()
    params = _loop_params(loop)
    assert params["once"] is True and params["model_name"] == LOOP.model_name
    assert (params["window"], params["gate_window"]) == (LOOP.window, LOOP.gate_window)
    assert params["end"] is None  # each run ends its windows at the moment it starts
    assert params["workspace"] == MONITOR_ROOT and params["triton_url"] == VARIANTS[CLAIM_TRITON_FILE].grpc_url
    with pytest.raises(NoSuchOption, match="--onc"):
        _loop_params({**loop, "args": ["loop", "--onc"]})  # the parser is strict: a misspelt flag fails


def test_the_loop_switches_the_one_triton_serving_the_claims_model_repository():
    _, pod, loop = _loop()
    params = _loop_params(loop)
    docs = _docs(CLAIM_TRITON_FILE)
    triton_pod, triton = docs["Deployment"]["spec"]["template"]["spec"], _triton(docs["Deployment"])
    host, port = params["triton_url"].split(":")
    assert host == docs["Service"]["metadata"]["name"] and int(port) in [p["port"] for p in docs["Service"]["spec"][
        "ports"] if p["name"] == "grpc"]
    assert docs["Deployment"]["spec"]["replicas"] == 1  # the gate's load, its Locust run and the switch reach one pod
    # the loop's workspace is the claim Triton serves from: the gate's `<model>-gate` copy and the promotion land there
    (claim,) = _mounted_claims(pod, loop)
    workspace = Workspace(params["workspace"])
    assert _mounted_claims(triton_pod, triton)[claim] == _mounted_claims(pod, loop)[claim] == str(workspace.root)
    assert f"--model-repository={workspace.model_repository}" in triton["args"]
    assert "--model-control-mode=explicit" in triton["args"] and "--grpc-use-ssl=true" not in triton["args"]
    for path in (workspace.audit_log, workspace.root / LOCK_FILE, workspace.root / "prediction_log"):
        assert path.is_relative_to(workspace.root)  # on the claim, shared with every pod that mounts it
    env = {e["name"]: e for e in loop["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")  # a server: no SQLite on a network file system
    (triton_key,) = [e for e in triton["env"] if e["name"] == ADMIN_KEY_ENV]
    assert env[ADMIN_KEY_ENV]["valueFrom"] == triton_key["valueFrom"]  # the key the claim Triton restricts with
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (
        triton_pod["securityContext"]["runAsUser"], triton_pod["securityContext"]["fsGroup"])


def test_the_loop_reads_the_admin_key_from_the_variable_its_cli_uses(monkeypatch):
    from server.admin import model_control

    _, _, loop = _loop()
    (env,) = [e for e in loop["env"] if "valueFrom" in e]
    monkeypatch.setenv(env["name"], "key-from-the-secret")
    assert TritonSettings().admin_key.get_secret_value() == "key-from-the-secret"
    client = model_control(_loop_params(loop)["triton_url"])  # what `treeops loop --triton-url` builds
    assert client is not None and client.ssl is False


def test_the_loop_cronjob_runs_once_at_a_time_and_never_retries():
    cronjob, pod, loop = _loop()
    assert cronjob["concurrencyPolicy"] == "Forbid" and cronjob["timeZone"] == "Etc/UTC"
    assert cronjob["startingDeadlineSeconds"] == LOOP.starting_deadline_s
    job = cronjob["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never" and "podFailurePolicy" not in job
    assert job["activeDeadlineSeconds"] + cronjob["startingDeadlineSeconds"] < 24 * 3600  # done before the next day
    minute, *_ = cronjob["schedule"].split()
    assert minute != _docs(MONITORING_FILE)["CronJob"]["spec"]["schedule"].split()[0]
    assert {"cpu", "memory"} <= loop["resources"]["requests"].keys() <= loop["resources"]["limits"].keys()


def test_the_loop_refuses_a_triton_that_does_not_serve_its_claim():
    with pytest.raises(ValueError, match="repository='claim' and prediction_log_claim='treeops-monitoring'"):
        render_loop(LoopSpec(), VARIANTS["triton-cpu.yaml"])
    with pytest.raises(ValueError, match="plaintext gRPC.*tls_secret=None"):
        render_loop(LoopSpec(), K8sSpec(repository="claim"))
    with pytest.raises(ValueError, match="set prediction_log_claim"):
        K8sSpec(repository="claim", prediction_log_claim=None)


@pytest.mark.slow
def test_the_loop_cronjobs_command_exits_1_at_once_while_another_loop_holds_the_lock(tmp_path):
    """The container's command run with the venv's real `treeops` (workspace moved to `tmp_path`): with the
    workspace's lock held, as by a run that outlived its schedule, it does nothing and exits 1 (no retry)."""
    from retraining.loop import loop_lock

    _, _, loop = _loop()
    args = [*loop["args"]]
    args[args.index("--workspace") + 1] = str(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000"}
    with loop_lock(tmp_path):
        done = subprocess.run([str(Path(sys.executable).parent / "treeops"), *args], capture_output=True, text=True,
                              timeout=120, env=env)
    assert done.returncode == 1 and "another `treeops loop` is running" in done.stderr, done.stderr
