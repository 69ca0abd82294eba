"""Causal depthwise convolution over time, SiLU, and an optional L2 normalisation of channel groups:
one validated entry point over three paths.

    y_t = silu(sum_{j<K} w[:, j] * x_{t-K+1+j}),   x_t for t < 0 from `tail` (zeros when None)
    y_t[G] = y_t[G] / max(|y_t[G]|, 1e-12)        for each group G of `group` channels among the first
                                                  `channels` (normalize=(channels, group): the heads of q, k)

    reference.py   float64 step-by-step loop, ground truth for tests
    shifted.py     K shifted multiply-adds in torch ops: any device and dtype
    fused_cpu.py   one C kernel (short_conv.c) forward and backward: fp32 CPU tensors

`kernels.short_conv` chooses the fused kernel for fp32 CPU tensors when it could be built (a C
compiler is needed; without one, one warning says so and the torch path runs), the torch path
otherwise, unless `backend=` forces one.
"""
from __future__ import annotations

import torch

from kernels.conv import fused_cpu
from kernels.conv.reference import short_conv_reference
from kernels.conv.shifted import short_conv_shifted

BACKENDS = ("fused_cpu", "shifted", "reference")


def _check_inputs(x, weight, tail, normalize) -> None:
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"short_conv: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"short_conv: x must have shape [B, T >= 1, C], got {tuple(x.shape)}")
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"short_conv: weight must have shape [C, K] = [{C}, K >= 1] to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[1]
    if tail is not None:
        if not isinstance(tail, torch.Tensor) or tuple(tail.shape) != (B, K - 1, C):
            shape = tuple(tail.shape) if isinstance(tail, torch.Tensor) else type(tail).__name__
            raise ValueError(f"short_conv: tail must be None or a tensor of shape [B, K-1, C] = {[B, K - 1, C]}, got {shape}")
        if tail.device != x.device:
            raise ValueError(f"short_conv: tail is on {tail.device} and x on {x.device}; move them to one device")
    if (not isinstance(normalize, tuple) or len(normalize) != 2 or not all(type(n) is int for n in normalize)
            or not 0 <= normalize[0] <= C or normalize[1] < 1 or normalize[0] % normalize[1]):
        raise ValueError(f"short_conv: normalize must be (channels, group) with 0 <= channels <= C = {C}, group >= 1 "
                         f"and channels a multiple of group, got {normalize!r}")
    if weight.device != x.device:
        raise ValueError(f"short_conv: weight is on {weight.device} and x on {x.device}; move them to one device")


def short_conv(
    x: torch.Tensor,  # [B, T, C]
    weight: torch.Tensor,  # [C, K]
    tail: torch.Tensor | None = None,  # [B, K-1, C]: the K-1 inputs before x; None means zeros
    *,
    normalize: tuple[int, int] = (0, 1),  # (channels, group): L2-normalise the first channels per group
    backend: str | None = None,  # None: "fused_cpu" for fp32 CPU tensors when built, else "shifted"
) -> torch.Tensor:  # y [B, T, C] in x's dtype (float64 for "reference")
    """silu(causal depthwise conv_K(x)), groups normalised as asked, differentiable in x, weight and tail."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"short_conv: unknown backend {backend!r}; choose one of {BACKENDS} or None (automatic)")
    _check_inputs(x, weight, tail, normalize)
    if backend == "reference":
        return short_conv_reference(x, weight, tail, normalize)
    if backend == "shifted":
        return short_conv_shifted(x, weight, tail, normalize)
    fits = fused_cpu.supports(x, weight, tail)
    if backend == "fused_cpu" and not fits:
        raise ValueError("short_conv: backend='fused_cpu' takes fp32 CPU tensors with contiguous channels and "
                         f"K <= {fused_cpu.MAX_TAPS}; got x {x.dtype} on {x.device}, stride {x.stride()}, "
                         f"K {weight.shape[1]}. Use backend='shifted' (or None)")
    if fused_cpu.KERNEL.choose(fits, forced=backend == "fused_cpu", caller="short_conv",
                               fallback="the torch path (kernels.conv.shifted)"):
        return fused_cpu.short_conv_fused_cpu(x, weight, tail, normalize)
    return short_conv_shifted(x, weight, tail, normalize)


__all__ = ["BACKENDS", "short_conv", "short_conv_reference", "short_conv_shifted"]
