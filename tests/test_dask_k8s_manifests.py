"""The committed Dask training manifests are the rendered ones, valid for Kubernetes, and run the real CLI."""

from __future__ import annotations

import socket

import kubernetes_validate
import pytest
import typer
import yaml

from training.k8s_manifests import CLUSTER_FILE, JOB_FILE, MANIFEST_DIR, DaskK8sSpec, render_files
from treeops.cli import app

K8S_VERSION = "1.31"


def _docs() -> dict[str, dict]:
    """Documents by kind; the two Services as `Service` (the scheduler's) and `Service/headless`."""
    docs = {}
    for d in _all():
        headless = d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
        docs[d["kind"] + ("/headless" if headless else "")] = d
    return docs


def _all() -> list[dict]:
    return [d for name in (CLUSTER_FILE, JOB_FILE) for d in yaml.safe_load_all((MANIFEST_DIR / name).read_text())]


def _container(doc: dict) -> dict:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def test_committed_manifests_are_the_rendered_ones():
    rendered = render_files()
    assert sorted(p.name for p in MANIFEST_DIR.glob("*.yaml")) == sorted(rendered)
    for name, text in rendered.items():
        assert (MANIFEST_DIR / name).read_text() == text, (
            f"training/k8s/{name} is stale: run `python -m training.k8s_manifests` and commit the result")


def test_manifest_validates_offline_against_kubernetes_schemas(monkeypatch):
    def no_network(*args: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = _all()
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "Service", "StatefulSet", "Job"]
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_a_misspelt_field_fails_validation():
    job = _docs()["Job"]
    job["spec"]["backofflimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError, match="backofflimit"):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_job_runs_treeops_train_on_the_scheduler_service_with_real_options():
    docs = _docs()
    spec = DaskK8sSpec()
    args = _container(docs["Job"])["args"]
    assert args[:3] == ["train", "--engine", "dask"]
    assert args[args.index("--scheduler") + 1] == spec.scheduler_address
    service = docs["Service"]
    assert spec.scheduler_address == f"tcp://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    train = typer.main.get_command(app).commands["train"]
    known = {opt for p in train.params for opt in p.opts}
    assert {a for a in args if a.startswith("--")} <= known
    train.make_context("train", list(args[1:]))  # the real parser accepts them (raises on a bad option)


def test_workers_have_stable_names_and_the_scheduler_does_not_steal_work():
    docs = _docs()
    workers = docs["StatefulSet"]
    worker = _container(workers)
    assert workers["spec"]["replicas"] == DaskK8sSpec().workers
    assert workers["spec"]["serviceName"] == docs["Service/headless"]["metadata"]["name"]
    assert worker["args"][:2] == ["worker", DaskK8sSpec().scheduler_address]
    assert worker["args"][worker["args"].index("--name") + 1] == "$(POD_NAME)"
    assert {"name": "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING", "value": "False"} in _container(
        docs["Deployment"])["env"]
    assert worker["resources"]["requests"]["memory"] == worker["args"][worker["args"].index("--memory-limit") + 1]


def test_spec_rejects_unknown_fields():
    with pytest.raises(ValueError, match="replicas"):
        DaskK8sSpec(replicas=3)
