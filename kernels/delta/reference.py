"""Ground truth for the gated delta rule: a float64 loop over time. Used by tests only.

Per batch b and head h, with a matrix state S of shape [Dv, Dk]:

    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    a_t = exp(log_alpha_t)
    o_t = S_t q_t
"""
from __future__ import annotations

import torch


def delta_rule_reference(
    q: torch.Tensor,  # [B, H, T, Dk]
    k: torch.Tensor,  # [B, H, T, Dk]
    v: torch.Tensor,  # [B, H, T, Dv]
    log_alpha: torch.Tensor,  # [B, H, T]
    beta: torch.Tensor,  # [B, H, T]
    initial_state: torch.Tensor | None = None,  # [B, H, Dv, Dk]
) -> tuple[torch.Tensor, torch.Tensor]:  # o [B, H, T, Dv] float64, final state [B, H, Dv, Dk] float64
    """Differentiable (plain autograd) float64 loop; returns float64 results."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    qs, ks, vs = q.double(), k.double(), v.double()
    a = log_alpha.double().exp()
    b = beta.double()
    if initial_state is None:
        state = torch.zeros(B, H, Dv, Dk, dtype=torch.float64, device=v.device)
    else:
        state = initial_state.double()
    outs = []
    for t in range(T):
        k_t = ks[:, :, t]  # [B, H, Dk]
        a_t = a[:, :, t, None, None]
        b_t = b[:, :, t, None, None]
        # a S (I - b k k^T) + b v k^T  =  a S - a b (S k) k^T + b v k^T
        s_k = torch.einsum("bhvk,bhk->bhv", state, k_t)
        state = a_t * state + b_t * torch.einsum("bhv,bhk->bhvk", vs[:, :, t] - a_t[..., 0] * s_k, k_t)
        outs.append(torch.einsum("bhvk,bhk->bhv", state, qs[:, :, t]))
    o = torch.stack(outs, dim=2) if outs else vs.new_zeros(B, H, 0, Dv)
    return o, state
