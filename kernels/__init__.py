"""Kernels used by the model. Today one op: the linear recurrent scan.

    from kernels import scan
    h, h_last = scan(log_a, x, h0)        # h_t = exp(log_a_t) * h_{t-1} + x_t

Each op lives in its own folder (kernels/scan/) with the naive reference beside the fast paths.
Note: `kernels.scan` is the function; the op's modules are imported as `kernels.scan.cpu` etc.
"""
from kernels.scan import BACKENDS, scan, scan_reference

__all__ = ["BACKENDS", "scan", "scan_reference"]
