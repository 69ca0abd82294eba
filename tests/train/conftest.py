"""Fixtures of the training tests: a small real dataset (shards, manifest, SentencePiece tokenizer)
and a config builder for one-process runs of a model small enough for milliseconds per step."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Config, resolve
from tests.support.synthetic_data import write_synthetic_dataset

SEQ_LEN, BATCH = 16, 2
SMALL_MODEL = {"name": "tiny", "d_model": 32, "n_layers": 2, "ffn_dim": 64, "n_heads": 2}


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), seq_len=SEQ_LEN, train_samples=96,
                                   val_samples=16, samples_per_shard=16)


def make_config(manifest: str, runs: Path, stage: str = "stage1", **sections) -> Config:
    """8 fp32 steps of batch 2 x 16 tokens, validation and a checkpoint every 4 steps, one process."""
    values = {
        "model": dict(SMALL_MODEL),
        "train": dict(lr=3e-3, warmup_steps=2, max_steps=8, seq_len=SEQ_LEN, micro_batch_size=BATCH, eval_every=4,
                      eval_batches=2, checkpoint_every=4, log_every=1, weight_decay=0.01, precision="fp32"),
        "data": dict(manifest=manifest),
        "run": dict(storage_path=str(runs)),
    }
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes} if isinstance(changes, dict) else changes
    return resolve(values, stage=stage)
