"""Fixtures of the cluster tests: a real Ray head started with `ray start --head` (stopped by PID),
a small prepared dataset in the real shard format, and a config builder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.pipeline import LocalRayHead
from core.config import Config, resolve
from tests.support.synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray head with 2 CPUs and a dashboard (for `ray job submit`); yields its addresses.

    The same LocalRayHead the smoke pipeline uses: `ray start --head --block`, stopped by its PID.
    """
    import ray

    log = tmp_path_factory.mktemp("ray") / "head.log"
    with LocalRayHead(2, log, env={"PYTHONPATH": str(REPO)}) as head:
        os.environ["RAY_ADDRESS"] = head.gcs
        ray.init(address=head.gcs, log_to_driver=False)
        try:
            yield {"address": head.gcs, "dashboard": head.dashboard, "env": head.env}
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), seq_len=SEQ_LEN, train_samples=64, val_samples=8)


def make_config(manifest: str, storage: Path, stage: str = "stage1", **sections) -> Config:
    """A tiny fp32 job: 2 DeepSpeed workers, ZeRO-2, 8 steps of global batch 16 (one epoch of the dataset)."""
    values = {
        "model": {"name": "tiny"},
        "train": dict(seq_len=SEQ_LEN, micro_batch_size=8, max_steps=8, warmup_steps=2, lr=3e-3, eval_every=0,
                      checkpoint_every=3, log_every=1, precision="fp32"),
        "engine": dict(kind="deepspeed", zero_stage=2),
        "scaling": dict(num_workers=2, cpus_per_worker=1.0),
        "fault_tolerance": dict(max_failures=1, step_timeout_s=120.0),
        "data": dict(manifest=manifest),
        "run": dict(storage_path=str(storage), record_sample_digests=True),
    }
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes} if isinstance(changes, dict) else changes
    return resolve(values, stage=stage)
