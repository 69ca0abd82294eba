"""Kernels used by the model: the linear recurrent scan and the gated delta rule.

    from kernels import scan, delta_rule
    h, h_last = scan(log_a, x, h0)        # h_t = exp(log_a_t) * h_{t-1} + x_t
    o, state = delta_rule(q, k, v, log_alpha, beta, state)
                                          # S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t

Each op lives in its own folder (kernels/scan/, kernels/delta/) with the naive reference beside
the fast paths. Note: `kernels.scan` is the function; the op's modules are imported as
`kernels.scan.cpu` etc. `BACKENDS` is the scan's; the delta rule's is `kernels.delta.BACKENDS`.
"""
from kernels.delta import delta_rule
from kernels.scan import BACKENDS, scan, scan_reference

__all__ = ["BACKENDS", "delta_rule", "scan", "scan_reference"]
