"""Compiled delta-rule Triton kernels on a CUDA GPU against the float64 reference (skipped without a GPU)."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA GPU: compiled Triton kernels cannot run here (test_delta_triton.py covers them interpreted)",
    ),
]

# fp32 inputs: 3xTF32 dots (about fp32 accuracy). bf16/fp16 inputs: TF32 dots (10 mantissa bits)
# and outputs rounded to the input dtype; the fp32 final state carries the TF32 rounding.
FP32_TOLERANCE = 1e-5
HALF_TOLERANCE = {"default": 2e-2, "final": 1e-2}


def _triton(**options):
    from kernels.delta.triton_delta import delta_rule_triton

    return functools.partial(delta_rule_triton, **options)


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 16, 16), (2, 1, 37, 5, 9), (2, 4, 300, 64, 64), (1, 2, 1000, 64, 128)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_reference_fp32(shape, mode, with_state, make_delta_case, check_delta_against_reference):
    case = make_delta_case(*shape, mode=mode, with_state=with_state, device="cuda")
    check_delta_against_reference(_triton(), case, FP32_TOLERANCE)


@pytest.mark.parametrize("options", [dict(chunk=16), dict(chunk=32, block_v=32), dict(chunk=64, block_v=16)], ids=str)
def test_other_tile_sizes(options, make_delta_case, check_delta_against_reference):
    case = make_delta_case(2, 2, 517, 64, 64, mode="mixed", device="cuda")
    check_delta_against_reference(_triton(**options), case, FP32_TOLERANCE)


@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["state_same", "state_fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, state_dtype, make_delta_case, check_delta_against_reference):
    case = make_delta_case(2, 4, 700, 64, 64, mode="mixed", dtype=dtype, state_dtype=state_dtype, device="cuda")
    check_delta_against_reference(_triton(), case, HALF_TOLERANCE)


def test_float64_inputs(make_delta_case, check_delta_against_reference):
    case = make_delta_case(2, 2, 150, 64, 64, mode="mixed", dtype=torch.float64, device="cuda")
    check_delta_against_reference(_triton(), case, 1e-12)


def test_chunked_calls_equal_one_call(make_delta_case):
    case = make_delta_case(2, 4, 300, 64, 64, mode="mixed", device="cuda")
    q, k, v, log_alpha, beta, state = case.inputs().values()
    whole, whole_final = kernels.delta_rule(q, k, v, log_alpha, beta, state)
    first, mid = kernels.delta_rule(q[:, :, :100], k[:, :, :100], v[:, :, :100], log_alpha[:, :, :100], beta[:, :, :100], state)
    second, final = kernels.delta_rule(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:], log_alpha[:, :, 100:], beta[:, :, 100:], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, whole_final, rtol=1e-5, atol=1e-5)


def test_cuda_tensors_take_the_triton_path_and_match_the_chunk_algorithm(make_delta_case):
    # The model's shape: B 8, H 4, T 2048, Dk = Dv = 64, bf16, against the chunk path run on the GPU.
    case = make_delta_case(8, 4, 2048, 64, 64, mode="mixed", dtype=torch.bfloat16, device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in case.inputs().values()]
    o, final = kernels.delta_rule(*leaves)
    assert type(o.grad_fn).__name__ == "DeltaRuleTritonFunctionBackward"
    grads = torch.autograd.grad((o.float() * case.grad_o.float()).sum() + final.sum(), leaves)
    chunk_leaves = [t.clone().float().requires_grad_(True) for t in case.inputs().values()]
    o_chunk, final_chunk = kernels.delta_rule(*chunk_leaves, backend="chunk")
    grads_chunk = torch.autograd.grad((o_chunk * case.grad_o.float()).sum() + final_chunk.sum(), chunk_leaves)
    for name, got, want in zip(["o", "final", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dstate"],
                               [o, final, *grads], [o_chunk, final_chunk, *grads_chunk]):
        assert torch.isfinite(got).all(), name
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert error <= 2e-2, f"{name}: relative error {error} against the chunk path"
