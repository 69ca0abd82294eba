"""Causal depthwise convolution + SiLU (+ L2 norm of groups) in torch ops: K shifted multiply-adds, any device and dtype.

The path for CUDA, for bf16/fp16/fp64 tensors, and on CPUs where the C kernel cannot be built.
Autograd differentiates it as written (about 25 passes over [B, T, C] forward and backward
together; `kernels.conv.fused_cpu` does it in two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.conv.reference import normalize_groups


def short_conv_shifted(
    x: torch.Tensor,  # [B, T, C]
    weight: torch.Tensor,  # [C, K]
    tail: torch.Tensor | None,  # [B, K-1, C] inputs before x, or None for zeros
    normalize: tuple[int, int] = (0, 1),  # (channels, group): the first channels L2-normalised per group
) -> torch.Tensor:  # y [B, T, C] in x's dtype
    B, T, C = x.shape
    K = weight.shape[1]
    if tail is None:
        tail = x.new_zeros(B, K - 1, C)
    padded = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, T + K - 1, C]
    weight = weight.to(x.dtype)
    y = padded[:, K - 1 :] * weight[:, -1]
    for j in range(K - 1):  # cheaper than conv1d's im2col for K = 4
        y = torch.addcmul(y, padded[:, j : j + T], weight[:, j])
    return normalize_groups(F.silu(y), normalize)
