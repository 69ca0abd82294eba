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


def _private_delta_rule(q, k, v, log_alpha, beta, initial_state=None, *, chunk_size=64, backend=None):
    """Stand-in with kernels.delta_rule's signature, used only while `kernels` does not export it yet:
    a plain loop in float64 (S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t)."""
    B, H, T, Dk = k.shape
    acc = torch.float64
    S = (torch.zeros(B, H, v.shape[-1], Dk, dtype=acc, device=v.device) if initial_state is None
         else initial_state.to(acc))
    outs = []
    for t in range(T):
        a, b = log_alpha[:, :, t, None, None].to(acc).exp(), beta[:, :, t, None, None].to(acc)
        k_t, v_t = k[:, :, t].to(acc), v[:, :, t].to(acc)
        S_k = (S @ k_t[..., None])[..., 0]
        S = a * S + b * (v_t - a[..., 0] * S_k)[..., :, None] * k_t[..., None, :]
        outs.append((S @ q[:, :, t, :, None].to(acc))[..., 0])
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    return torch.stack(outs, 2).to(v.dtype), S.to(state_dtype)


import kernels  # noqa: E402

if not hasattr(kernels, "delta_rule"):  # TODO(issue 12): drop once kernels exports delta_rule
    try:
        from kernels.delta import delta_rule as _delta_rule
    except ImportError:
        _delta_rule = _private_delta_rule
    kernels.delta_rule = _delta_rule
