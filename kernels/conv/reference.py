"""Float64 step-by-step causal depthwise convolution + SiLU (+ L2 norm of groups): the ground truth for the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_reference(
    x: torch.Tensor,  # [B, T, C]
    weight: torch.Tensor,  # [C, K]
    tail: torch.Tensor | None,  # [B, K-1, C] inputs before x, or None for zeros
    normalize: tuple[int, int] = (0, 1),  # (channels, group): the first channels L2-normalised per group
) -> torch.Tensor:  # y [B, T, C] float64: y_t = silu(sum_j w_j x_{t-K+1+j})
    B, T, C = x.shape
    K = weight.shape[1]
    x, weight = x.double(), weight.double()
    before = torch.zeros(B, K - 1, C, dtype=torch.float64) if tail is None else tail.double()
    padded = torch.cat([before, x], dim=1)  # padded[:, t + K - 1] is x_t
    rows = []
    for t in range(T):
        pre = sum(padded[:, t + j] * weight[:, j] for j in range(K))
        rows.append(F.silu(pre))
    return normalize_groups(torch.stack(rows, dim=1), normalize)


def normalize_groups(y: torch.Tensor, normalize: tuple[int, int]) -> torch.Tensor:
    """y [B, T, C] with its first `channels` channels L2-normalised in consecutive groups of `group`."""
    channels, group = normalize
    if channels == 0:
        return y
    head = F.normalize(y[..., :channels].unflatten(-1, (channels // group, group)), dim=-1).flatten(-2)
    return torch.cat([head, y[..., channels:]], dim=-1)
