"""Compiled Triton kernels on a CUDA GPU against the float64 reference (skipped without a GPU)."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA GPU: compiled Triton kernels cannot run here (test_scan_triton.py covers them interpreted)",
    ),
]


def _triton(**tile):
    from kernels.scan.triton_scan import scan_triton

    return functools.partial(scan_triton, **tile)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 17), (3, 130, 64), (4, 1000, 257)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, mode, with_h0, make_case, check_against_reference):
    case = make_case(*shape, mode=mode, with_h0=with_h0, device="cuda")
    check_against_reference(_triton(), case, 1e-5)


@pytest.mark.parametrize("tile", [dict(chunk=16, block_d=16), dict(chunk=128, block_d=64)], ids=["small", "large"])
def test_other_tile_sizes(tile, make_case, check_against_reference):
    case = make_case(2, 517, 100, mode="mixed", device="cuda")
    check_against_reference(_triton(**tile), case, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, make_case, check_against_reference):
    case = make_case(2, 700, 96, mode="mixed", dtype=dtype, device="cuda")
    check_against_reference(_triton(), case, 1e-2)


def test_bfloat16_accumulates_in_fp32():
    # Compiled Triton rounds fp32 -> bf16 to nearest even, as torch does: the result is exact.
    T = 600
    log_a = torch.zeros(1, T, 1, dtype=torch.bfloat16, device="cuda")
    x = torch.ones(1, T, 1, dtype=torch.bfloat16, device="cuda")
    h, _ = _triton()(log_a, x)
    expected = torch.arange(1, T + 1, dtype=torch.float32, device="cuda").to(torch.bfloat16)
    assert torch.equal(h[0, :, 0], expected)


def test_cuda_tensors_take_the_triton_path_and_match_the_cpu_algorithm(make_case):
    case = make_case(4, 300, 64, mode="mixed", device="cuda")
    log_a = case.log_a.clone().requires_grad_(True)
    h, h_last = kernels.scan(log_a, case.x, case.h0)
    assert type(h.grad_fn).__name__ == "TritonScanFunctionBackward"
    h_cpu_algorithm, h_last_cpu_algorithm = kernels.scan(case.log_a, case.x, case.h0, backend="cpu")
    torch.testing.assert_close(h, h_cpu_algorithm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_last, h_last_cpu_algorithm, rtol=1e-5, atol=1e-5)
