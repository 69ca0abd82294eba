"""Scan kernels. Provisional entry point: replaced by the dispatching implementation."""
from __future__ import annotations

import torch

from kernels.scan.reference import scan_reference


def scan(log_a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None, backend: str | None = None):
    h, h_last = scan_reference(log_a, x, h0)
    return h.to(x.dtype), h_last.to(x.dtype)


__all__ = ["scan", "scan_reference"]
