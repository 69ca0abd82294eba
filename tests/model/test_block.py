"""The vectorised block (short convolution, chunked delta rule) against the naive float64 token loop."""
import copy
import math

import pytest
import torch

from mmrec.model import MMRecBlock
from mmrec.model.block import decay_gate
from mmrec.model.reference import block_reference


@pytest.mark.parametrize("T", [1, 16, 21, 40])  # one token; one chunk exactly; ends mid-chunk; several chunks
@pytest.mark.parametrize("conv_size", [4, 0])
def test_block_matches_naive_reference(micro_config, T, conv_size):
    block = MMRecBlock(micro_config.replace(conv_size=conv_size), decay_lo=0.3).double()
    _assert_matches_reference(block, T, micro_config)


@pytest.mark.parametrize("overrides", [{"memory": False}, {"channel_recurrence": True}])
def test_ablation_blocks_match_naive_reference(micro_config, overrides):
    """benchmarks' memory-off ablation (the first design's channel recurrence in the memory's place)."""
    block = MMRecBlock(micro_config.replace(**overrides), decay_lo=0.3).double()
    _assert_matches_reference(block, 21, micro_config)


def _assert_matches_reference(block, T, micro_config):
    for p in block.parameters():  # fresh, non-trivial weights everywhere, norms included
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, T, micro_config.d_model, dtype=torch.float64)
    out, state = block(x)
    expected = block_reference(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert state.position == T
    H, dh = micro_config.n_heads, micro_config.d_model // micro_config.n_heads
    assert state.memory is None if not block.memory else state.memory.shape == (2, H, dh, dh)
    assert (state.conv is None) == (block.conv is None)
    assert (state.h is None) == (not block.channel_recurrence)


@pytest.mark.parametrize("lo", [0.05, 0.999])
def test_decay_gate_is_exact_in_fp32_at_extreme_gates(lo):
    """log gamma and 1 - gamma stay exact where sigmoid(f) rounds to 0 or 1 in fp32 (gamma near 1)."""
    f = torch.tensor([-200.0, -30.0, -3.0, 0.0, 3.0, 30.0, 200.0])
    log_gamma, one_minus_gamma = decay_gate(f, lo)
    want_one_minus = [(1 - lo) / (1 + math.exp(v)) for v in f.double().tolist()]  # float64, exact to rounding
    want_log = [math.log1p(-y) for y in want_one_minus]
    torch.testing.assert_close(log_gamma.double(), torch.tensor(want_log, dtype=torch.float64), rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(one_minus_gamma.double(), torch.tensor(want_one_minus, dtype=torch.float64), rtol=1e-5, atol=1e-30)
    assert (log_gamma <= 0).all() and (one_minus_gamma >= 0).all()  # gamma in (lo, 1): the state cannot blow up


def test_memory_state_stays_fp32_under_bf16_autocast(micro_config):
    block = MMRecBlock(micro_config, decay_lo=0.5)
    x = torch.randn(2, 19, micro_config.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = block(x)
    assert state.memory.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_recall_through_the_memory_is_by_content(micro_config):
    """Write a key -> value once, then read it back by the key alone after distractors: the read of the
    matrix state is the stored value (the delta rule with beta = 1 and no decay stores it exactly)."""
    import kernels

    dh = 8
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 6, dh, dtype=torch.float64), dim=-1)
    keys = torch.linalg.qr(keys[0, 0].T)[0].T[None, None]  # 6 orthonormal keys
    values = torch.randn(1, 1, 6, dh, dtype=torch.float64)
    q = torch.cat([keys, keys[:, :, 2:3]], dim=2)  # the last step queries key 2
    k = torch.cat([keys, torch.zeros(1, 1, 1, dh, dtype=torch.float64)], dim=2)
    v = torch.cat([values, torch.zeros(1, 1, 1, dh, dtype=torch.float64)], dim=2)
    beta = torch.tensor([[[1.0] * 6 + [0.0]]], dtype=torch.float64)
    o, _ = kernels.delta_rule(q, k, v, torch.zeros_like(beta), beta, chunk_size=4)
    torch.testing.assert_close(o[0, 0, -1], values[0, 0, 2])


def test_fp32_block_on_the_c_kernels_matches_its_float64_copy_and_bf16_stays_close(micro_config):
    """fp32 on CPU runs the C kernels (short conv with q, k normalised in its pass; the recurrent delta
    rule); float64 runs the torch paths; bf16 autocast normalises q, k after the cast to fp32."""
    torch.manual_seed(0)
    block = MMRecBlock(micro_config, decay_lo=0.3)
    x = torch.randn(2, 45, micro_config.d_model)
    out, state = block(x)
    out64, state64 = copy.deepcopy(block).double()(x.double())
    update, update64 = out.double() - x.double(), out64 - x.double()  # the block's own contribution, not the residual
    assert ((update - update64).norm() / update64.norm()).item() < 1e-5
    assert ((state.memory.double() - state64.memory).norm() / state64.memory.norm()).item() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16, _ = block(x)
    assert ((out_bf16.double() - x.double() - update64).norm() / update64.norm()).item() < 5e-2
