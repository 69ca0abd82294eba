"""Fixtures of the cluster tests: a real Ray head started with `ray start --head` (stopped by PID),
a small prepared dataset in the real shard format, and a job-config builder."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import JobConfig
from cluster.synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray head with 2 CPUs and a dashboard (for `ray job submit`); yields its addresses."""
    ray_bin = Path(sys.executable).with_name("ray")
    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    log = open(temp_dir / "head.log", "w")
    process = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
    )
    address, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:
        probe = subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True, env=env)
        if probe.returncode == 0:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"ray head did not start; see {temp_dir / 'head.log'}")
        time.sleep(1)
    import ray

    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, log_to_driver=False)
    try:
        yield {"address": address, "dashboard": dashboard, "env": env}
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        # --block keeps `ray start` in the foreground: signalling its process group stops the head it owns.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), seq_len=SEQ_LEN, train_samples=64, val_samples=8)


def make_job(manifest: str, storage: Path, stage: str = "stage1", **sections) -> JobConfig:
    """A tiny fp32 job: 2 workers, ZeRO-2, 8 steps of global batch 16 (one epoch of the dataset)."""
    values = {
        "stage": stage,
        "model": "tiny",
        "train": dict(seq_len=SEQ_LEN, micro_batch_size=8, max_steps=8, warmup_steps=2, lr=3e-3, eval_every=0,
                      checkpoint_every=3, log_every=1),
        "zero": dict(stage=2),
        "scaling": dict(num_workers=2, cpus_per_worker=1.0),
        "fault_tolerance": dict(max_failures=1, step_timeout_s=120.0),
        "data": dict(manifest=manifest),
        "run": dict(storage_path=str(storage), metrics=False, record_sample_digests=True),
    }
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes} if isinstance(changes, dict) else changes
    return JobConfig.from_dict(values)

