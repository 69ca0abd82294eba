"""Causal depthwise convolution + SiLU (+ L2 norm of channel groups) as one C kernel for fp32 CPU
tensors (short_conv.c, built on first use by kernels.c_build: a C compiler is needed).

Forward and backward each make one pass over the rows (the torch version, `shifted.py`, about
25, and F.normalize a dozen more); the backward recomputes the pre-activation instead of saving
it. Threads: the kernel splits channels over torch.get_num_threads() POSIX threads.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels import c_build

SOURCE = Path(__file__).with_name("short_conv.c")
MAX_TAPS = 16  # as in short_conv.c
NORM_EPS = 1e-12  # F.normalize's


_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
KERNEL = c_build.CKernel(SOURCE, {
    "short_conv_silu_forward": ([_i64] * 4 + [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int], _int),
    "short_conv_silu_backward": ([_i64] * 4 + [_ptr, _i64, _i64] + [_ptr] * 6 + [_i64, _i64, _f32, _int], _int),
})
_library = KERNEL.library
available = KERNEL.available


def supports(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None) -> bool:
    """Whether these tensors can take the C path: fp32, CPU, channels contiguous, K <= MAX_TAPS."""
    tensors = [x, weight] + ([tail] if tail is not None else [])
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and x.stride(-1) == 1 and 1 <= weight.shape[1] <= MAX_TAPS)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_STATUS = {-1: "taps out of range", -2: "out of memory", -3: "normalised channels are not whole groups"}


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"short_conv C kernel: {what} failed (status {status}: {_STATUS.get(status, 'unknown')})")


def forward_into(x: torch.Tensor, weight_kc: torch.Tensor, tail: torch.Tensor | None, out: torch.Tensor,
                 normalize: tuple[int, int] = (0, 1), eps: float = NORM_EPS) -> None:
    """out [B, T, C] (contiguous) = silu(conv(x)), the first normalize[0] channels L2-normalised in groups of
    normalize[1]; x [B, T, C] with unit channel stride, weight_kc [K, C] contiguous, tail [B, K-1, C]
    contiguous or None."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"short_conv C kernel unavailable: {why}")
    B, T, C = x.shape
    status = lib.short_conv_silu_forward(B, T, C, weight_kc.shape[0], x.data_ptr(), x.stride(0), x.stride(1),
                                         _pointer(tail), weight_kc.data_ptr(), out.data_ptr(), *normalize, eps,
                                         torch.get_num_threads())
    _check(status, "forward")


def backward_into(x, weight_kc, tail, grad_out, grad_x, grad_tail, grad_weight_kc,
                  normalize: tuple[int, int] = (0, 1), eps: float = NORM_EPS) -> None:
    """grad_x [B, T, C], grad_tail [B, K-1, C] (or None), grad_weight_kc [K, C]: all contiguous, all written."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"short_conv C kernel unavailable: {why}")
    B, T, C = x.shape
    status = lib.short_conv_silu_backward(
        B, T, C, weight_kc.shape[0], x.data_ptr(), x.stride(0), x.stride(1), _pointer(tail), weight_kc.data_ptr(),
        grad_out.data_ptr(), grad_x.data_ptr(), _pointer(grad_tail), grad_weight_kc.data_ptr(), *normalize, eps,
        torch.get_num_threads())
    _check(status, "backward")


class ShortConvSiluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tail, normalize):
        # x [B, T, C], weight [C, K], tail [B, K-1, C] or None, normalize (channels, group) -> out [B, T, C]
        weight_kc = weight.detach().t().contiguous()
        tail = tail.contiguous() if tail is not None else None
        out = torch.empty(x.shape, dtype=x.dtype)
        forward_into(x, weight_kc, tail, out, normalize)
        ctx.save_for_backward(x, weight_kc, tail)
        ctx.normalize = normalize
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight_kc, tail = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype)
        grad_tail = torch.empty(tail.shape, dtype=x.dtype) if tail is not None and ctx.needs_input_grad[2] else None
        grad_weight_kc = torch.empty_like(weight_kc)
        backward_into(x, weight_kc, tail, grad_out.contiguous(), grad_x, grad_tail, grad_weight_kc, ctx.normalize)
        return grad_x, grad_weight_kc.t(), grad_tail, None


def short_conv_fused_cpu(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None,
                         normalize: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """silu(causal depthwise conv) of x [B, T, C] with weight [C, K] after tail [B, K-1, C] (None: zeros),
    its first normalize[0] channels L2-normalised in groups of normalize[1]."""
    if not supports(x, weight, tail):
        raise ValueError("short_conv_fused_cpu takes fp32 CPU tensors with unit channel stride and "
                         f"K <= {MAX_TAPS}; got x {x.dtype} on {x.device} with strides {x.stride()}, K {weight.shape[1]}")
    return ShortConvSiluFunction.apply(x, weight, tail, normalize)
