"""Fixtures of the fault suite: a small real dataset, a trained export, and a helper that runs a launcher
as a real process and returns what a user would see (exit code, stdout, stderr)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 16
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.ffn_dim=64", "--set", "model.n_heads=2"]


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def launch(module: str, *args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> Ran:
    """`python -m <module> args...` as a real process; a hang fails the test through the timeout."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=environment)
    return Ran(run.returncode, run.stdout, run.stderr)


def train_args(manifest: str, runs: Path, *extra: str, stage: str = "stage1") -> list[str]:
    return ["--stage", stage, "--set", f"data.manifest={manifest}", "--set", f"run.storage_path={runs}",
            "--set", f"train.seq_len={SEQ_LEN}", "--set", "train.micro_batch_size=2", "--set", "train.max_steps=6",
            "--set", "train.warmup_steps=1", "--set", "train.eval_every=3", "--set", "train.eval_batches=1",
            "--set", "train.checkpoint_every=3", "--set", "train.log_every=1", *SMALL, *extra]


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), seq_len=SEQ_LEN, train_samples=48, val_samples=8)


@pytest.fixture(scope="session")
def base_export(manifest, tmp_path_factory) -> Path:
    """A real stage-1 export of this dataset, trained by the launcher itself."""
    runs = tmp_path_factory.mktemp("runs")
    ran = launch("launchers.train", *train_args(manifest, runs, "--set", "train.max_steps=3"))
    assert ran.code == 0, ran.text[-3000:]
    return runs / "stage1" / "exports" / "step_00000003"
