"""The Triton kernels, run by the Triton interpreter on CPU tensors, against the float64 reference.

The interpreter runs `tl.associative_scan` element by element in Python, so shapes stay small;
chunk=16 and block_d=16 still give several chunks, several channel blocks and ragged edges.
Compiled kernels on a GPU are tested in test_scan_cuda.py.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreted Triton tests need TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU; "
    "with a GPU the compiled kernels are tested by test_scan_cuda.py)",
)

FP32_TOLERANCE = 1e-5


def _triton(**tile):
    from kernels.scan.triton_scan import scan_triton

    return functools.partial(scan_triton, **tile)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 17)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, mode, with_h0, make_case, check_against_reference):
    case = make_case(*shape, mode=mode, with_h0=with_h0)
    check_against_reference(_triton(chunk=16, block_d=16), case, FP32_TOLERANCE)


@pytest.mark.parametrize("shape", [(1, 130, 3), (2, 20, 64)], ids=lambda s: "x".join(map(str, s)))
def test_long_and_wide_shapes(shape, make_case, check_against_reference):
    # 130 steps: nine chunks of 16 with a ragged tail; 64 channels: four channel blocks.
    case = make_case(*shape, mode="mixed")
    check_against_reference(_triton(chunk=16, block_d=16), case, FP32_TOLERANCE)


def test_default_tiles(make_case, check_against_reference):
    # The tile sizes the GPU uses (chunk 64, block_d 32), with a ragged chunk and channel block.
    case = make_case(1, 70, 40, mode="mixed")
    check_against_reference(_triton(), case, FP32_TOLERANCE)


def test_bfloat16_inputs(make_case, check_against_reference):
    case = make_case(2, 37, 17, mode="mixed", dtype=torch.bfloat16)
    check_against_reference(_triton(chunk=16, block_d=16), case, 1e-2)


def test_bfloat16_accumulates_in_fp32():
    # A running sum of ones crosses 256, where bf16 accumulation would stall (256 + 1 rounds to
    # 256). Only the stored result is rounded: within one bf16 step (2^-7 relative) of t. Not
    # exact, because the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
    T = 300
    log_a = torch.zeros(1, T, 1, dtype=torch.bfloat16)
    x = torch.ones(1, T, 1, dtype=torch.bfloat16)
    h, h_last = _triton(chunk=128, block_d=16)(log_a, x)
    steps = torch.arange(1, T + 1, dtype=torch.float32)
    assert ((h[0, :, 0].float() - steps).abs() <= steps * 2**-7).all()
    assert h_last.item() == float(T)


def test_float64_inputs(make_case, check_against_reference):
    case = make_case(1, 20, 5, mode="mixed", dtype=torch.float64)
    check_against_reference(_triton(chunk=8, block_d=8), case, 1e-12)


def test_tile_sizes_must_be_powers_of_two(make_case):
    case = make_case(1, 4, 4)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        _triton(chunk=12)(case.log_a, case.x)
