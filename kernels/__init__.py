"""Kernels used by the model: the linear recurrent scan, the gated delta rule and the short convolution.

    from kernels import scan, delta_rule, short_conv
    h, h_last = scan(log_a, x, h0)        # h_t = exp(log_a_t) * h_{t-1} + x_t
    o, state = delta_rule(q, k, v, log_alpha, beta, state)
                                          # S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t
    y = short_conv(x, weight, tail)       # y_t = silu(sum_j weight[:, j] x_{t-K+1+j})

Each op lives in its own folder (kernels/scan/, kernels/delta/, kernels/conv/) with the naive reference beside
the fast paths. Note: `kernels.scan` is the function; the op's modules are imported as
`kernels.scan.cpu` etc. `BACKENDS` is the scan's; the delta rule's is `kernels.delta.BACKENDS`.
"""
from kernels.conv import short_conv
from kernels.delta import delta_rule
from kernels.scan import BACKENDS, scan, scan_reference

__all__ = ["BACKENDS", "delta_rule", "scan", "scan_reference", "short_conv"]
