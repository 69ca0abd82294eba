"""Real processes, real signals, real Ray: no launcher hangs on a wrong address or a stale session,
SIGINT stops training with a checkpoint that resumes, and a stopped pipeline leaves no process behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.ray_head import LocalRayHead, free_port
from mmrec.train.checkpoint import list_checkpoints
from mmrec.train.records import read_records

from .conftest import REPO, launch, train_args

pytestmark = pytest.mark.slow


def _start(module: str, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            start_new_session=True)


def _read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """Lines of the process's output up to the first that contains `marker` (fails on exit or timeout)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"the process ended (exit {process.wait()}) before printing {marker!r}:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if marker in line:
            return "".join(seen)
    process.kill()
    pytest.fail(f"no {marker!r} within {timeout:g}s:\n{''.join(seen)[-3000:]}")


def test_sigint_during_training_checkpoints_at_the_next_step_and_the_run_resumes(manifest, tmp_path):
    runs = tmp_path / "runs"
    args = train_args(manifest, runs, "--set", "train.max_steps=40", "--set", "train.checkpoint_every=100",
                      "--set", "train.eval_every=0")
    process = _start("launchers.train", *args)
    _read_until(process, "step 5/40", timeout=240)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, rest
    assert "Traceback" not in rest and rest.count("stopped by SIGINT at step") == 1, rest
    stopped_at = int(rest.split("stopped by SIGINT at step ")[1].split(";")[0])
    run = str(runs / "stage1")
    assert f"step_{stopped_at:08d}-" in list_checkpoints(run)[0]  # written at the signal, not at a cadence
    resumed = launch("launchers.train", *args)
    assert resumed.code == 0, resumed.text[-3000:]
    assert f"resumed from {run}/step_{stopped_at:08d}-" in resumed.text
    steps = [r["step"] for r in read_records(run) if r["kind"] == "train"]
    assert steps == list(range(1, 41))  # every step once: nothing lost, nothing repeated


def test_prep_never_joins_a_stale_ray_session(tmp_path):
    # A head started with the machine's default temp dir (here a private RAY_TMPDIR) leaves its session
    # file behind when it is stopped by PID; a bare ray.init() would sit there forever.
    ray_tmp = Path(f"/tmp/rt-{os.getpid()}")  # short: Ray's socket paths live under it
    env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    try:
        started = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={free_port()}",
                                  "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                                 env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert list(ray_tmp.rglob("ray_current_cluster")), "the head wrote no session file"
        head = [p for p in psutil.process_iter(["cmdline"]) if str(ray_tmp) in " ".join(p.info["cmdline"] or [])]
        assert head, "no process of that head found"
        for process in head:  # stopped by PID, not by `ray stop`: the session file stays
            process.kill()
        psutil.wait_procs(head, timeout=30)
        assert list(ray_tmp.rglob("ray_current_cluster"))
        began = time.monotonic()
        ran = launch("launchers.prep", "--source", "demo?max_mb=0.2", "--out", str(tmp_path / "data"),
                     "--vocab-size", "512", "--seq-len", "32", "--no-progress", env=env, timeout=400)
        assert ran.code == 0, ran.text[-3000:]
        assert "connected to Ray at local" in ran.text and (tmp_path / "data" / "manifest.json").is_file()
        assert time.monotonic() - began < 400
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if str(ray_tmp) in " ".join(process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_closed_ray_address_fails_at_once_naming_it(tmp_path):
    port = free_port()  # nothing listens there
    for env in ({"RAY_ADDRESS": f"127.0.0.1:{port}"}, {}):
        extra = [] if env else ["--set", f"ray.address=127.0.0.1:{port}"]
        started = time.monotonic()
        ran = launch("launchers.prep", "--source", "demo?max_mb=0.1", "--out", str(tmp_path / "d"), *extra,
                     env=env, timeout=60)
        assert ran.code == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in ran.err, ran.text[-2000:]
        assert "Traceback" not in ran.text and time.monotonic() - started < 30


def test_a_stage_the_cluster_cannot_fit_gives_up_with_a_message(manifest, tmp_path):
    with LocalRayHead(2, tmp_path / "head.log", env={"PYTHONPATH": str(REPO)}) as head:
        started = time.monotonic()
        ran = launch("launchers.train", *train_args(manifest, tmp_path / "runs", "--set", "engine.kind=deepspeed",
                                                    "--set", "scaling.num_workers=4", "--set", "ray.schedule_timeout_s=5"),
                     env={"RAY_ADDRESS": head.gcs}, timeout=300)
    assert ran.code == 2, ran.text[-3000:]
    assert "needs 4 CPU (the cluster has 2)" in ran.err and "ray.schedule_timeout_s=5" in ran.err
    assert time.monotonic() - started < 120


def test_relative_paths_mean_the_callers_directory_for_every_worker(manifest, tmp_path):
    # The launcher runs in `work`, its Ray workers elsewhere: relative paths must mean `work` for both.
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(Path(manifest).parent, work / "data")
    with LocalRayHead(2, tmp_path / "head.log", env={"PYTHONPATH": str(REPO)}) as head:
        args = train_args("data/manifest.json", Path("runs"), "--set", "engine.kind=deepspeed",
                          "--set", "engine.zero_stage=1", "--set", "scaling.num_workers=2", "--set", "train.max_steps=2",
                          "--set", "train.eval_every=0")
        ran = launch("launchers.train", *args, cwd=work, env={"RAY_ADDRESS": head.gcs}, timeout=400)
    assert ran.code == 0, ran.text[-3000:]
    assert list_checkpoints(str(work / "runs" / "stage1"))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _all_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_a_stopped_pipeline_stops_its_jobs_and_its_head(tmp_path, how):
    process = _start("launchers.pipeline", "--out", str(tmp_path / "smoke"), "--set", "prep.sources=[\"demo?max_mb=0.6\"]",
                     "--set", "prep.val_fraction=0.25", "--set", "train.max_steps=400")
    _read_until(process, "submitted stage1", timeout=600)
    time.sleep(5)  # the stage-1 workers are starting
    spawned = _descendants(process.pid)
    assert len(spawned) > 3, "the pipeline, its head and its jobs should be running"
    started = time.monotonic()
    process.send_signal(how)
    process.wait(timeout=120)
    if how == signal.SIGINT:
        assert time.monotonic() - started < 90
    alive = _all_gone(spawned, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
