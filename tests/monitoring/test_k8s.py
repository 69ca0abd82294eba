"""k8s/: every overlay builds with `kubectl kustomize` and validates strictly, offline.

Core kinds are checked by kubernetes-validate's strict schemas, the KubeRay and
prometheus-operator kinds by k8s/schemas/ (whose pod templates use the same strict core
definitions), then the properties the issue asks for are checked on the built objects.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
import subprocess

import pytest
import yaml

from .conftest import K8S, REPO, RULES

OVERLAYS = sorted(str(p.parent.relative_to(K8S)) for p in (K8S / "overlays").rglob("kustomization.yaml"))
STAGE_JOBS = {"prep", "stage1", "stage2-text", "stage2-code", "stage3"}


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_manifests", REPO / "scripts" / "k8s" / "validate_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validator = _load_validator()


@pytest.fixture(scope="module")
def built(kubectl) -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        run = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True)
        assert run.returncode == 0, f"kubectl kustomize {overlay} failed:\n{run.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(node) -> list[dict]:
    """Every pod spec (a mapping with `containers`) anywhere inside an object, whatever its kind."""
    if isinstance(node, list):
        return [spec for item in node for spec in pod_specs(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if "containers" in node else []
    return found + [spec for value in node.values() for spec in pod_specs(value)]


def test_there_are_cluster_and_job_overlays_for_cpu_smoke_and_gpu():
    assert OVERLAYS == ["overlays/cpu-smoke", "overlays/cpu-smoke/jobs", "overlays/gpu", "overlays/gpu/jobs"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_output_validates_strictly(built, overlay):
    problems = validator.validate_documents(built[overlay])
    assert problems == []


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if not o.endswith("/jobs")])
def test_cluster_overlay_carries_cluster_monitoring_and_dashboard(built, overlay):
    docs = built[overlay]
    assert sorted(d["kind"] for d in docs) == sorted(
        ["Namespace", "ConfigMap", "ConfigMap", "ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule", "RayCluster"]
    )
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"mmrec"}
    (dashboard,) = [d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] == "mmrec-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["mmrec-training.json"] == (K8S / "monitoring" / "dashboard.json").read_text()
    (rule,) = objects(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_no_inline_credentials(built, overlay):
    docs = built[overlay]
    assert not objects(docs, "Secret"), "credentials must come from a Secret created outside the manifests"
    text = json.dumps(docs)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    containers = [c for spec in pod_specs(docs) for c in spec["containers"] + spec.get("initContainers", [])]
    assert containers
    for container in containers:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{container['name']}: {kind}"
    for cluster in objects(docs, "RayCluster"):
        for spec in pod_specs(cluster):
            (container,) = spec["containers"]
            assert {"secretRef": {"name": "mmrec-s3"}} in container["envFrom"]


def test_ray_dashboard_stays_inside_the_cluster(built):
    for overlay in OVERLAYS:
        for cluster in objects(built[overlay], "RayCluster"):
            head = cluster["spec"]["headGroupSpec"]
            assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)
        assert not objects(built[overlay], "Ingress") and not objects(built[overlay], "Service")


@pytest.mark.parametrize("overlay", ["overlays/cpu-smoke", "overlays/gpu"])
def test_pod_monitors_match_the_ports_the_pods_declare(built, overlay):
    docs = built[overlay]
    (cluster,) = objects(docs, "RayCluster")
    monitors = {m["metadata"]["name"]: m for m in objects(docs, "PodMonitor")}
    for monitor in monitors.values():
        assert monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    trainer_ports = {e["port"] for e in monitors["mmrec-trainers"]["spec"]["podMetricsEndpoints"]}
    for container in workers:
        declared = {p["name"]: p["containerPort"] for p in container["ports"]}
        # Worker i's exporter lands on 9400 + i (mmrec.metrics searches upward from 9400).
        metrics_ports = {n: port for n, port in declared.items() if n.startswith("mmrec-metrics-")}
        assert metrics_ports and set(metrics_ports) <= trainer_ports
        assert all(port == 9400 + int(n.rsplit("-", 1)[1]) for n, port in metrics_ports.items())
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert str(ports["metrics"]) == group["rayStartParams"]["metrics-export-port"]


@pytest.mark.parametrize("overlay", ["overlays/cpu-smoke/jobs", "overlays/gpu/jobs"])
def test_one_ray_job_per_stage_runs_our_launchers_on_the_cluster(built, overlay):
    from launchers.train import main as train_main

    cluster_overlay = overlay.removesuffix("/jobs")
    (cluster,) = objects(built[cluster_overlay], "RayCluster")
    (job_config,) = [d for d in objects(built[cluster_overlay], "ConfigMap") if d["metadata"]["name"] == "mmrec-job-config"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-config")
    assert next(v for v in head["volumes"] if v["name"] == "job-config")["configMap"]["name"] == "mmrec-job-config"

    jobs = {j["metadata"]["labels"]["mmrec.io/stage"]: j for j in objects(built[overlay], "RayJob")}
    assert set(jobs) == STAGE_JOBS
    for stage, job in jobs.items():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        argv = shlex.split(job["spec"]["entrypoint"])
        if stage == "prep":
            assert argv[:3] == ["python", "-m", "launchers.prep"] and "--out" in argv
            assert argv[argv.index("--out") + 1].startswith("s3://")
            continue
        assert argv[:5] == ["python", "-m", "launchers.train", "--stage", stage]
        config_path = argv[argv.index("--config") + 1]
        assert config_path == f"{mount['mountPath']}/job.toml"

    # The launcher accepts each stage's arguments with the overlay's config (the file the head
    # pod mounts), parsed and validated by the real CLI.
    return_codes = {}
    for stage, job in jobs.items():
        if stage == "prep":
            continue
        argv = shlex.split(job["spec"]["entrypoint"])[3:]
        local = REPO / "k8s" / cluster_overlay / "job.toml"
        assert local.read_text() == job_config["data"]["job.toml"]
        argv[argv.index("--config") + 1] = str(local)
        return_codes[stage] = train_main([*argv, "--print-config"])
    assert return_codes == {s: 0 for s in STAGE_JOBS - {"prep"}}


@pytest.mark.parametrize(
    "kind, path, misspelled",
    [
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"], "resource"),
        ("RayCluster", ["spec", "headGroupSpec", "rayStartParams"], "rayStartParam"),
        ("RayJob", ["spec", "entrypoint"], "entryPoint"),
        ("RayJob", ["spec", "submitterPodTemplate", "spec", "restartPolicy"], "restartpolicy"),
        ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "interval"], "intervall"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "annotations"], "anotations"),
        ("ConfigMap", ["data"], "dat"),
        ("Namespace", ["metadata", "labels"], "label"),
    ],
)
def test_a_misspelled_field_fails_validation_naming_it(built, kind, path, misspelled):
    docs = copy.deepcopy(built["overlays/gpu"] + built["overlays/gpu/jobs"])
    doc = next(d for d in docs if d["kind"] == kind)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[misspelled] = parent.pop(path[-1])
    problems = validator.validate_documents(docs)
    assert problems, f"{kind} with {misspelled!r} passed validation"
    assert all(p.startswith(f"{kind}/") for p in problems)
    assert any(f"'{misspelled}' was unexpected" in p for p in problems), problems


def test_unknown_kind_is_an_error_not_a_pass():
    problems = validator.validate_documents([{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}])
    assert problems == [
        "Widget/w: no schema for example.com/v1 Widget: add one to k8s/schemas/ and CUSTOM_SCHEMAS, or fix apiVersion/kind"
    ]
