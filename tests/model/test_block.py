"""The vectorised block (segment grid, online-softmax writes, scans) against the naive float64 token loop."""
import math

import pytest
import torch

from mmrec.model import MMRecBlock
from mmrec.model.block import decay_gate
from mmrec.model.reference import block_reference


@pytest.mark.parametrize("T", [8, 21, 40])  # one segment exactly; ends mid-segment; several segments
def test_block_matches_naive_reference(micro_config, T):
    block = MMRecBlock(micro_config, decay_lo=0.3).double()
    for p in block.parameters():  # fresh, non-trivial weights everywhere, norms included
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, T, micro_config.d_model, dtype=torch.float64)
    out, state = block(x)
    expected = block_reference(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert state.position == T


@pytest.mark.parametrize("lo", [0.05, 0.999])
def test_decay_gate_is_exact_in_fp32_at_extreme_gates(lo):
    """log gamma and 1 - gamma stay exact where sigmoid(f) rounds to 0 or 1 in fp32 (gamma near 1)."""
    f = torch.tensor([-200.0, -30.0, -3.0, 0.0, 3.0, 30.0, 200.0])
    log_gamma, one_minus_gamma = decay_gate(f, lo)
    want_one_minus = [(1 - lo) / (1 + math.exp(v)) for v in f.double().tolist()]  # float64, exact to rounding
    want_log = [math.log1p(-y) for y in want_one_minus]
    torch.testing.assert_close(log_gamma.double(), torch.tensor(want_log, dtype=torch.float64), rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(one_minus_gamma.double(), torch.tensor(want_one_minus, dtype=torch.float64), rtol=1e-5, atol=1e-30)
    assert (log_gamma <= 0).all() and (one_minus_gamma >= 0).all()  # gamma in (lo, 1): the recurrence cannot blow up


def test_scan_state_stays_fp32_under_bf16_autocast(micro_config):
    block = MMRecBlock(micro_config, decay_lo=0.5)
    x = torch.randn(2, 19, micro_config.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = block(x)
    assert state.h.dtype == torch.float32 and state.memory.dtype == torch.float32
    assert state.write_sum.dtype == torch.float32
    assert torch.isfinite(out).all()
