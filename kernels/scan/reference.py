"""Ground truth for the scan: a float64 loop over time. Used by tests only.

    h_t = exp(log_a_t) * h_{t-1} + x_t,    log_a_t <= 0
"""
from __future__ import annotations

import torch


def scan_reference(
    log_a: torch.Tensor,  # [B, T, D]
    x: torch.Tensor,  # [B, T, D]
    h0: torch.Tensor | None = None,  # [B, D]
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D] float64, h_last [B, D] float64
    """Differentiable (plain autograd) float64 loop; returns float64 results."""
    B, T, D = x.shape
    a = log_a.double().exp()
    xs = x.double()
    h = torch.zeros(B, D, dtype=torch.float64, device=x.device) if h0 is None else h0.double()
    outs = []
    for t in range(T):
        h = a[:, t] * h + xs[:, t]
        outs.append(h)
    hs = torch.stack(outs, dim=1) if outs else xs.new_zeros(B, 0, D)
    return hs, h
