"""Fixtures of the training tests: a tiny real model config and random token streams."""
from __future__ import annotations

import numpy as np
import pytest

from mmrec import get_config
from mmrec.train import TokenStream, TrainConfig

SEQ_LEN, BATCH, VOCAB = 16, 2, 64


@pytest.fixture
def model_cfg():
    # Smaller than `tiny` so each step takes milliseconds; segment_len < SEQ_LEN exercises the memory.
    return get_config("tiny", vocab_size=VOCAB, d_model=32, n_layers=2, ffn_dim=64, n_heads=2,
                      memory_slots=4, segment_len=8, seq_len=SEQ_LEN)


@pytest.fixture
def train_cfg():
    return TrainConfig(lr=3e-3, warmup_steps=2, max_steps=8, seq_len=SEQ_LEN, micro_batch_size=BATCH,
                       eval_every=4, eval_batches=2, checkpoint_every=4, log_every=100, weight_decay=0.01)


def random_tokens(seed: int, n: int = 4000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Some structure (a repeating ramp plus noise) so a few steps can lower the loss.
    base = np.arange(n) % 7
    return {"text": (base + rng.integers(0, 3, n)) % VOCAB, "code": (base * 3 + rng.integers(0, 2, n)) % VOCAB}


@pytest.fixture
def streams():
    def make(seed: int = 0, domains=("text", "code"), batch: int = BATCH):
        tokens = random_tokens(seed)
        train = TokenStream({d: tokens[d] for d in domains}, seq_len=SEQ_LEN, local_batch=batch, seed=seed)
        val_tokens = random_tokens(seed + 1000, 800)
        val = TokenStream({d: val_tokens[d] for d in domains}, seq_len=SEQ_LEN, local_batch=batch, shuffle=False)
        return train, val

    return make
