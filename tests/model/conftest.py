"""Fixtures of the model tests: deterministic seeds and a config small enough for the float64 reference scan."""
import pytest
import torch

from mmrec import get_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def micro_config():
    """tiny, shrunk further: 8-token segments so a 40-token sequence crosses several segment borders."""
    return get_config("tiny", vocab_size=97, d_model=32, ffn_dim=64, n_heads=4, memory_slots=4, segment_len=8)
