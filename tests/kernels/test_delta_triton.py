"""The Triton delta-rule kernels, run by the Triton interpreter on CPU tensors, against the
float64 reference: outputs, final state and the gradient of every input.

The interpreter runs every tile operation in numpy, so shapes stay small (T <= 70, Dk, Dv <= 32);
chunk 16 still gives several chunks with a ragged last one, Dk = 5 and Dv = 9 exercise the padding
of key and value tiles to 16, and block_v = 16 with Dv = 32 two value blocks (whose partial
gradients are summed). Outputs are allocated full of NaN by the launchers, so anything a kernel
fails to write fails the finiteness check. Compiled kernels on a GPU: test_delta_cuda.py.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreted Triton tests need TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU; "
    "with a GPU the compiled kernels are tested by test_delta_cuda.py)",
)

FP32_TOLERANCE = 1e-5


def _triton(**options):
    from kernels.delta.triton_delta import delta_rule_triton

    return functools.partial(delta_rule_triton, **{"chunk": 16} | options)


@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
def test_matches_reference_fp32(mode, make_delta_case, check_delta_against_reference):
    # T = 37: three chunks of 16, the last ragged; Dk = 5, Dv = 9 padded to 16-wide tiles.
    case = make_delta_case(2, 1, 37, 5, 9, mode=mode)
    check_delta_against_reference(_triton(), case, FP32_TOLERANCE)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16, 16), (1, 2, 20, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_without_initial_state(shape, make_delta_case, check_delta_against_reference):
    case = make_delta_case(*shape, mode="mixed", with_state=False)
    check_delta_against_reference(_triton(), case, FP32_TOLERANCE)


def test_several_value_blocks(make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 1, 40, 8, 32, mode="mixed")
    check_delta_against_reference(_triton(block_v=16), case, FP32_TOLERANCE)


def test_default_chunk(make_delta_case, check_delta_against_reference):
    # The chunk the GPU uses (64): T = 70 is one full chunk and a ragged one.
    case = make_delta_case(1, 1, 70, 16, 16, mode="mixed")
    check_delta_against_reference(_triton(chunk=64), case, FP32_TOLERANCE)


def test_unnormalised_small_keys(make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 2, 30, 8, 8, mode="moderate", key_norm=0.5)
    check_delta_against_reference(_triton(), case, FP32_TOLERANCE)


def test_bfloat16_inputs_with_fp32_state(make_delta_case, check_delta_against_reference):
    # o and the gradients are rounded to bf16; the fp32 final state is computed in fp32.
    case = make_delta_case(1, 2, 33, 16, 16, mode="mixed", dtype=torch.bfloat16, state_dtype=torch.float32)
    check_delta_against_reference(_triton(), case, {"default": 1e-2, "final": 1e-5})


def test_float64_inputs(make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 1, 19, 4, 4, mode="mixed", dtype=torch.float64)
    check_delta_against_reference(_triton(), case, 1e-12)


@pytest.mark.parametrize("chunk", [8, 48])
def test_chunk_must_be_a_power_of_two_of_at_least_16(chunk, make_delta_case):
    case = make_delta_case(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=rf"needs chunk_size to be a power of two >= 16 \(tl.dot tiles\), got {chunk}"):
        _triton(chunk=chunk)(*case.inputs().values())
