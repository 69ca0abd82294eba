"""Small building blocks shared by the experts and the fusion layer: RMSNorm and the SwiGLU FFN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, fp64 for fp64: recurrences never accumulate below fp32."""
    return torch.promote_types(t.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim], same dtype
        xf = x.to(accumulation_dtype(x))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, dim] -> [B, T, dim]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
