"""The chunked PyTorch scan against the float64 reference: values, gradients, dtypes, stability."""
from __future__ import annotations

import functools

import pytest
import torch

from kernels.scan.cpu import scan_cpu
from kernels.scan.reference import scan_reference

SHAPES = [(1, 1, 1), (2, 37, 17), (2, 130, 64), (3, 300, 5)]
FP32_TOLERANCE = 1e-5


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, mode, with_h0, make_case, check_against_reference):
    # chunk=16 puts several chunk boundaries (and a ragged last chunk) inside every T > 16.
    case = make_case(*shape, mode=mode, with_h0=with_h0)
    check_against_reference(functools.partial(scan_cpu, chunk=16), case, FP32_TOLERANCE)


@pytest.mark.parametrize("chunk", [1, 2, 128, 512])
def test_chunk_size_does_not_change_results(chunk, make_case, check_against_reference):
    case = make_case(2, 300, 9, mode="mixed")
    check_against_reference(functools.partial(scan_cpu, chunk=chunk), case, FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, make_case, check_against_reference):
    case = make_case(2, 130, 33, mode="mixed", dtype=dtype)
    # Outputs and gradients are rounded to the input dtype (bf16: 8 significant bits).
    check_against_reference(functools.partial(scan_cpu, chunk=16), case, 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(dtype):
    # A running sum of ones: accumulated in bf16 it would stall at 256 (256 + 1 rounds to 256).
    T = 600
    log_a = torch.zeros(1, T, 2, dtype=dtype)
    x = torch.ones(1, T, 2, dtype=dtype)
    h, h_last = scan_cpu(log_a, x, chunk=16)
    expected = torch.arange(1, T + 1, dtype=torch.float32)[None, :, None].expand(1, T, 2)
    torch.testing.assert_close(h.float(), expected.to(dtype).float(), rtol=0, atol=0)
    assert h_last.float().tolist() == [[float(T), float(T)]]


def test_gradcheck_float64(generator):
    B, T, D = 2, 11, 3
    log_a = (-torch.rand(B, T, D, generator=generator, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(B, T, D, generator=generator, dtype=torch.float64).requires_grad_(True)
    h0 = torch.randn(B, D, generator=generator, dtype=torch.float64).requires_grad_(True)
    # chunk=4: the gradient crosses two chunk boundaries and a ragged last chunk.
    assert torch.autograd.gradcheck(lambda a, b, c: scan_cpu(a, b, c, chunk=4), (log_a, x, h0))


def test_extreme_decays_stay_finite(generator):
    # log_a = -20 at every step gives window decays of e^-2560: products must underflow to 0,
    # never overflow (as exp(+cumsum) formulations do).
    B, T, D = 2, 300, 8
    log_a = torch.full((B, T, D), -20.0).requires_grad_(True)
    x = torch.randn(B, T, D, generator=generator).requires_grad_(True)
    h, h_last = scan_cpu(log_a, x)
    (h.sum() + h_last.sum()).backward()
    for tensor in (h, h_last, log_a.grad, x.grad):
        assert torch.isfinite(tensor).all()
    # With a ~ 2e-9 the state is essentially the current input.
    torch.testing.assert_close(h, x.detach(), rtol=1e-6, atol=1e-6)


def test_chunked_calls_equal_one_call(generator):
    # Feeding a sequence in two pieces, with h_last as the next h0, is the same recurrence.
    B, T, D = 2, 100, 6
    log_a = -torch.rand(B, T, D, generator=generator)
    x = torch.randn(B, T, D, generator=generator)
    h0 = torch.randn(B, D, generator=generator)
    whole, whole_last = scan_cpu(log_a, x, h0)
    first, first_last = scan_cpu(log_a[:, :41], x[:, :41], h0)
    second, second_last = scan_cpu(log_a[:, 41:], x[:, 41:], first_last)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second_last, whole_last, rtol=1e-6, atol=1e-6)


def test_runs_on_gradients_of_only_one_output(make_case):
    # Autograd hands the backward a zero tensor for an unused output; both cases must work.
    case = make_case(2, 40, 4)
    log_a = case.log_a.clone().requires_grad_(True)
    _, h_last = scan_cpu(log_a, case.x, case.h0, chunk=16)
    (grad_only_last,) = torch.autograd.grad(h_last.sum(), log_a)
    log_a_ref = case.log_a.double().requires_grad_(True)
    _, h_last_ref = scan_reference(log_a_ref, case.x, case.h0)
    (grad_ref,) = torch.autograd.grad(h_last_ref.sum(), log_a_ref)
    torch.testing.assert_close(grad_only_last.double(), grad_ref, rtol=1e-5, atol=1e-6)
