"""The scan op, h_t = exp(log_a_t) * h_{t-1} + x_t: one validated entry point over three paths.

    reference.py    float64 loop, ground truth for tests
    cpu.py          chunked PyTorch (hand-written backward); the path for CPU tensors
    triton_scan.py  chunked Triton kernels (forward and backward); the path for CUDA tensors

`kernels.scan` (this module's `scan`) chooses by device unless `backend=` forces a path.
"""
from __future__ import annotations

import torch

from kernels.scan.cpu import scan_cpu
from kernels.scan.reference import scan_reference

BACKENDS = ("triton", "cpu", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(log_a: object, x: object, h0: object) -> None:
    for name, value in (("log_a", log_a), ("x", x)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"scan: {name} must be a torch.Tensor of shape [B, T, D], got {type(value).__name__}")
    if h0 is not None and not isinstance(h0, torch.Tensor):
        raise ValueError(f"scan: h0 must be None or a torch.Tensor of shape [B, D], got {type(h0).__name__}")
    if x.dim() != 3:
        raise ValueError(f"scan: x must have shape [B, T, D], got {tuple(x.shape)}")
    if log_a.shape != x.shape:
        raise ValueError(
            f"scan: log_a and x must have the same shape [B, T, D], got {tuple(log_a.shape)} and {tuple(x.shape)}"
        )
    B, T, D = x.shape
    if T == 0:
        raise ValueError("scan: the sequence is empty (T = 0); pass at least one time step")
    if h0 is not None and tuple(h0.shape) != (B, D):
        raise ValueError(f"scan: h0 must have shape [B, D] = {[B, D]} to match x {tuple(x.shape)}, got {tuple(h0.shape)}")
    tensors = {"log_a": log_a, "x": x} | ({"h0": h0} if h0 is not None else {})
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"scan: x has dtype {x.dtype}; use one of {[str(d) for d in SUPPORTED_DTYPES]}")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"scan: inputs must share one dtype, got {dtypes}; cast them to x's dtype ({x.dtype})")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"scan: inputs must be on one device, got {devices}; move them to x's device ({x.device})")


def scan(
    log_a: torch.Tensor,  # [B, T, D], log decay, <= 0
    x: torch.Tensor,  # [B, T, D]
    h0: torch.Tensor | None = None,  # [B, D]; None means zeros
    *,
    backend: str | None = None,  # None: "triton" for CUDA tensors, "cpu" otherwise
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D], h_last [B, D], both in x's dtype
    """h_t = exp(log_a_t) * h_{t-1} + x_t, differentiable in log_a, x and h0.

    bf16/fp16 inputs accumulate in fp32 on every path. log_a must be <= 0 (a decay); this is
    not checked, because checking would cost a device sync on every call.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"scan: unknown backend {backend!r}; choose one of {BACKENDS} or None (by device)")
    _check_inputs(log_a, x, h0)
    chosen = backend or ("triton" if x.is_cuda else "cpu")
    if chosen == "cpu":
        return scan_cpu(log_a.contiguous(), x.contiguous(), h0)
    if chosen == "reference":
        h, h_last = scan_reference(log_a, x, h0)
        return h.to(x.dtype), h_last.to(x.dtype)
    # Imported here so that CPU-only users never pay for (or depend on) importing Triton.
    from kernels.scan import triton_scan

    if not x.is_cuda and not triton_scan.INTERPRETED:
        raise ValueError(
            "scan: backend='triton' needs CUDA tensors; on CPU tensors it only runs under the Triton "
            "interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported. "
            "Use backend='cpu' (or None) for CPU tensors."
        )
    return triton_scan.scan_triton(log_a.contiguous(), x.contiguous(), h0.contiguous() if h0 is not None else None)


__all__ = ["BACKENDS", "scan", "scan_cpu", "scan_reference"]
