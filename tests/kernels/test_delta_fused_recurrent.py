"""The step-by-step C kernel of the gated delta rule (kernels/delta/fused_recurrent.c) against the
float64 reference on fresh random inputs: every decay/write-strength mode, the head sizes with
their own compiled copies (64, 32, 16) and the generic one, lengths around the 64-step
checkpoints; outputs poisoned with NaN before the kernel writes them."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.delta import fused_recurrent
from kernels.delta.reference import delta_rule_reference

from .conftest import GATE_MODES, relative_error


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = fused_recurrent.available()
    assert ok, f"the fused recurrent C kernel must build on this machine (it has a C compiler): {why}"


@pytest.mark.parametrize("mode", GATE_MODES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("B, H, T, Dk, Dv", [(1, 2, 130, 64, 64), (2, 2, 64, 32, 32), (1, 3, 65, 16, 16),
                                            (2, 3, 37, 8, 12), (1, 1, 1, 5, 3)])
def test_matches_float64_reference(B, H, T, Dk, Dv, mode, with_state, make_delta_case, check_delta_against_reference):
    case = make_delta_case(B, H, T, Dk, Dv, mode=mode, with_state=with_state)
    errors = check_delta_against_reference(
        lambda *x: kernels.delta_rule(*x, backend="fused_recurrent"), case, {"default": 2e-5}
    )
    assert set(errors) >= {"o", "final", "dq", "dk", "dv", "dlog_alpha", "dbeta"}


@pytest.mark.parametrize("threads", [1, 4])
def test_every_output_is_written(threads, generator):
    """Raw entry points with NaN-filled outputs: nothing may stay unwritten (T crosses two checkpoints)."""
    BH, T, Dk, Dv = 5, 131, 16, 24
    q = torch.randn(BH, T, Dk, generator=generator)
    k = torch.nn.functional.normalize(torch.randn(BH, T, Dk, generator=generator), dim=-1)
    v = torch.randn(BH, T, Dv, generator=generator)
    log_alpha, beta = -torch.rand(BH, T, generator=generator), torch.rand(BH, T, generator=generator)
    h0 = torch.randn(BH, Dk, Dv, generator=generator)

    def nan(*shape):
        return torch.full(shape, float("nan"))

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, h_final, checkpoints = nan(BH, T, Dv), nan(BH, Dk, Dv), nan(BH, 3, Dk, Dv)
        fused_recurrent.forward_into(q, k, v, log_alpha, beta, h0, o, h_final, checkpoints)
        grads = [nan(*t.shape) for t in (q, k, v, log_alpha, beta, h0)]
        fused_recurrent.backward_into(q, k, v, log_alpha, beta, checkpoints, torch.randn(BH, T, Dv, generator=generator),
                                      torch.randn(BH, Dk, Dv, generator=generator), *grads)
    finally:
        torch.set_num_threads(saved)
    for name, t in zip(["o", "final", "checkpoints", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dh0"],
                       [o, h_final, checkpoints, *grads]):
        assert not t.isnan().any(), f"{name} has unwritten entries"
    # H = S^T layout: compare with the reference's [B, H, Dv, Dk] state
    o_ref, final_ref = delta_rule_reference(q[None], k[None], v[None], log_alpha[None], beta[None],
                                            h0.transpose(-1, -2)[None])
    assert relative_error(o, o_ref[0]) < 1e-5 and relative_error(h_final, final_ref[0].transpose(-1, -2)) < 1e-5


def test_cpu_fp32_dispatch_and_chunk_agree_on_a_long_sequence(generator):
    """The model's head shape over 2,000 steps: the C kernel (the default for fp32 CPU) and the chunk path agree."""
    B, H, T, D = 1, 2, 2000, 64
    q = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=generator), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=generator), dim=-1)
    v = torch.randn(B, H, T, D, generator=generator)
    log_alpha, beta = -0.05 * torch.rand(B, H, T, generator=generator), torch.rand(B, H, T, generator=generator)
    leaf = q.clone().requires_grad_(True)
    o, final = kernels.delta_rule(leaf, k, v, log_alpha, beta)
    assert type(o.grad_fn).__name__ == "DeltaRuleFusedRecurrentFunctionBackward"
    o_chunk, final_chunk = kernels.delta_rule(q, k, v, log_alpha, beta, backend="chunk", chunk_size=32)
    assert relative_error(o, o_chunk) < 1e-5 and relative_error(final, final_chunk) < 1e-5


def test_nan_input_reaches_the_output():
    q, k, v = (torch.randn(1, 1, 10, 8) for _ in range(3))
    v[0, 0, 3, 2] = float("nan")
    o, _ = kernels.delta_rule(q, torch.nn.functional.normalize(k, dim=-1), v, -torch.rand(1, 1, 10), torch.rand(1, 1, 10))
    assert not o[0, 0, :3].isnan().any() and o[0, 0, 3:].isnan().any()


def test_empty_batch():
    q, k, v = (torch.randn(0, 2, 5, 8) for _ in range(3))
    leaf = q.clone().requires_grad_(True)
    o, final = kernels.delta_rule(leaf, k, v, torch.zeros(0, 2, 5), torch.zeros(0, 2, 5), backend="fused_recurrent")
    (o.sum() + final.sum()).backward()
    assert o.shape == (0, 2, 5, 8) and final.shape == (0, 2, 8, 8) and leaf.grad.shape == q.shape
