"""Fixtures of the model tests: deterministic seeds and a config small enough for the float64 reference loop."""
import pytest
import torch

from mmrec import get_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def micro_config():
    """tiny, shrunk further (D 32, 4 heads of 8): 16-step delta-rule chunks, so a 40-token sequence spans
    three chunks and chunked runs cut both on and off the kernel's chunk grid."""
    return get_config("tiny", vocab_size=97, d_model=32, ffn_dim=64, n_heads=4, chunk_size=16)

