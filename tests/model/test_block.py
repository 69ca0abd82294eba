"""The vectorised block (segment grid, online-softmax writes, scans) against the naive float64 token loop."""
import math

import pytest
import torch

from mmrec.model import MMRecBlock
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


def test_log_decay_is_stable_at_extreme_gates(micro_config):
    """log gamma must be finite and exact even where sigmoid(f) rounds to 0 or 1 in fp32."""
    lo = 0.999
    block = MMRecBlock(micro_config, decay_lo=lo)
    f = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0])
    log_gamma = torch.logaddexp(torch.full_like(f, block.log_lo), block.log_one_minus_lo + torch.nn.functional.logsigmoid(f))
    exact = [math.log(lo + (1 - lo) / (1 + math.exp(-v))) for v in f.double().tolist()]
    assert torch.isfinite(log_gamma).all()
    torch.testing.assert_close(log_gamma.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert (log_gamma < 0).all()  # gamma < 1: the recurrence cannot blow up


def test_scan_state_stays_fp32_under_bf16_autocast(micro_config):
    block = MMRecBlock(micro_config, decay_lo=0.5)
    x = torch.randn(2, 19, micro_config.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = block(x)
    assert state.h.dtype == torch.float32 and state.memory.dtype == torch.float32
    assert state.write_sum.dtype == torch.float32
    assert torch.isfinite(out).all()
