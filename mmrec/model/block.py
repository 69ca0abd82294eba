"""One MM-Rec block (DESIGN.md 3.1): gated linear recurrence + segment memory + SwiGLU FFN.

    u = RMSNorm(x);  z, f, g, o = split(W_in u)
    gamma_t = lo + (1 - lo) sigmoid(f_t)        decay, per channel, in (lo, 1)
    h_t = gamma_t h_{t-1} + (1 - gamma_t) sigmoid(g_t) z_t      (kernels.scan, fp32 or wider)
    m_t = memory read;  x += dropout(W_out((h_t + m_t) silu(o_t)));  x += dropout(SwiGLU(RMSNorm(x)))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from mmrec.config import ModelConfig
from mmrec.model.layers import RMSNorm, SwiGLU, accumulation_dtype
from mmrec.model.memory import SegmentMemory
from mmrec.model.state import BlockState


def decay_gate(f: torch.Tensor, lo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma = lo + (1 - lo) sigmoid(f), returned as (log gamma, 1 - gamma).

    1 - gamma = (1-lo) sigmoid(-f) is computed directly (no cancellation), and log gamma = log1p(-(1 - gamma))
    is then exact to rounding exactly where it matters, gamma near 1 (the long-memory channels), and
    never positive, so the scan cannot grow.
    """
    one_minus_gamma = (1.0 - lo) * torch.sigmoid(-f)
    return torch.log1p(-one_minus_gamma), one_minus_gamma


class MMRecBlock(nn.Module):
    def __init__(self, config: ModelConfig, decay_lo: float):
        super().__init__()
        D = config.d_model
        self.decay_lo = decay_lo
        self.in_norm = RMSNorm(D, config.norm_eps)
        self.in_proj = nn.Linear(D, 4 * D, bias=False)  # z, f, g, o in one matmul
        self.memory = SegmentMemory(D, config.n_heads, config.memory_slots, config.segment_len, config.init_std)
        self.out_proj = nn.Linear(D, D, bias=False)
        self.ffn_norm = RMSNorm(D, config.norm_eps)
        self.ffn = SwiGLU(D, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> tuple[torch.Tensor, BlockState]:
        # x [B, T, D] -> [B, T, D]
        T = x.shape[1]
        z, f, g, o = self.in_proj(self.in_norm(x)).chunk(4, dim=-1)
        acc = accumulation_dtype(z)
        log_gamma, one_minus_gamma = decay_gate(f.to(acc), self.decay_lo)  # [B, T, D] each
        drive = one_minus_gamma * torch.sigmoid(g.to(acc)) * z.to(acc)
        h, h_last = kernels.scan(log_gamma, drive, None if state is None else state.h.to(acc))  # [B, T, D], [B, D]
        read, memory, write_max, write_norm, write_sum = self.memory(h, state)
        y = self.out_proj(((h + read) * F.silu(o.to(acc))).to(x.dtype))
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        position = 0 if state is None else state.position
        return x, BlockState(h_last, memory, write_max, write_norm, write_sum, position + T)
