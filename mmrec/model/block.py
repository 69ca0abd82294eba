"""One MM-Rec block (docs/design.md 3.1): a gated delta-rule associative memory per head + SwiGLU FFN.

    u = RMSNorm(x);   q, k, v, g, f, b = split(W_in u)            (one fused projection D -> 4D + 2H)
    q, k, v = silu(causal depthwise conv_K(q, k, v))              (short conv, K = conv_size taps)
    q, k = q / |q|, k / |k|                                       (per head, L2; fused into the conv when it runs)
    a_t = lo + (1 - lo) sigmoid(f_t)                              (MDI decay gate, per head, in (lo, 1); log space)
    b_t = sigmoid(b_t)                                            (MDI write strength, per head)
    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t q_t      (kernels.delta_rule, fp32 state)
    x += dropout(W_out(HeadRMSNorm(o) * silu(g)));   x += dropout(SwiGLU(RMSNorm(x)))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from mmrec.config import ModelConfig
from mmrec.model.layers import RMSNorm, SwiGLU, accumulation_dtype
from mmrec.model.state import BlockState


def decay_gate(f: torch.Tensor, lo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma = lo + (1 - lo) sigmoid(f), returned as (log gamma, 1 - gamma).

    1 - gamma = (1-lo) sigmoid(-f) is computed directly (no cancellation), and log gamma = log1p(-(1 - gamma))
    is then exact to rounding exactly where it matters, gamma near 1 (the long-memory heads), and
    never positive, so the state cannot grow.
    """
    one_minus_gamma = (1.0 - lo) * torch.sigmoid(-f)
    return torch.log1p(-one_minus_gamma), one_minus_gamma


class ShortConv(nn.Module):
    """silu of a causal depthwise convolution over time with K taps: y_t = silu(sum_j w_j x_{t-K+1+j}).

    The K - 1 inputs before the chunk come from the state (zeros at the start of a sequence), so
    a sequence run in chunks gives the same outputs as one run over the whole sequence. The op is
    `kernels.short_conv` (one fused C kernel for fp32 on CPU, torch ops elsewhere).
    """

    def __init__(self, channels: int, taps: int):
        super().__init__()
        self.taps = taps
        self.weight = nn.Parameter(torch.empty(channels, taps))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(taps), 1.0 / math.sqrt(taps))  # nn.Conv1d's default

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None,
                normalize: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, T, C]; tail [B, K-1, C] (the inputs before x) or None -> y [B, T, C], new tail [B, K-1, C].
        # normalize = (channels, group): the first channels of y L2-normalised per group (q and k per head).
        B, T, C = x.shape
        if tail is not None:
            tail = tail.to(x.dtype)
        y = kernels.short_conv(x, self.weight.to(x.dtype), tail, normalize=normalize)
        keep = self.taps - 1  # the last K-1 inputs, the next chunk's tail
        if T >= keep:
            new_tail = x[:, T - keep :]
        else:
            before = tail if tail is not None else x.new_zeros(B, keep, C)
            new_tail = torch.cat([before, x], dim=1)[:, -keep:]
        return y, new_tail


class MMRecBlock(nn.Module):
    def __init__(self, config: ModelConfig, decay_lo: float):
        super().__init__()
        D, H = config.d_model, config.n_heads
        self.n_heads, self.head_dim, self.decay_lo = H, D // H, decay_lo
        self.chunk_size, self.norm_eps = config.chunk_size, config.norm_eps
        self.memory = config.memory
        self.channel_recurrence = config.channel_recurrence or not config.memory
        self.in_norm = RMSNorm(D, config.norm_eps)
        if self.memory:  # q, k, v, g | f, b per head | (z, f_c, i_c when the channel recurrence runs beside it)
            conv_width = 3 * D
            self.in_proj = nn.Linear(D, 4 * D + 2 * H + (3 * D if self.channel_recurrence else 0), bias=False)
            self.out_norm_weight = nn.Parameter(torch.ones(D))  # per-head RMSNorm of the memory read, a gain per channel
        else:  # the ablation: z, g, f_c, i_c, the per-channel recurrence of the first design in the memory's place
            conv_width = D
            self.in_proj = nn.Linear(D, 4 * D, bias=False)
        self.conv = ShortConv(conv_width, config.conv_size) if config.conv_size else None
        self.out_proj = nn.Linear(D, D, bias=False)
        self.ffn_norm = RMSNorm(D, config.norm_eps)
        self.ffn = SwiGLU(D, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> tuple[torch.Tensor, BlockState]:
        # x [B, T, D] -> [B, T, D]
        B, T, D = x.shape
        projected = self.in_proj(self.in_norm(x))
        if self.memory:
            mixed_in, g, rest = projected.split([3 * D, D, projected.shape[-1] - 4 * D], dim=-1)
        else:
            mixed_in, g, rest = projected.split([D, D, 2 * D], dim=-1)
        conv_tail = None
        acc = accumulation_dtype(mixed_in)
        # q and k are L2-normalised per head in the convolution's pass when it runs in the accumulation
        # dtype (one C kernel for fp32 on CPU); bf16/fp16 inputs are normalised after the cast to fp32.
        normalized = self.conv is not None and self.memory and mixed_in.dtype == acc
        if self.conv is not None:  # silu included
            normalize = (2 * D, self.head_dim) if normalized else (0, 1)
            mixed_in, conv_tail = self.conv(mixed_in, None if state is None else state.conv, normalize)
        memory = h_last = None
        if self.memory:
            mixed, memory = self._read_memory(mixed_in.to(acc), rest[..., : 2 * self.n_heads].to(acc), state, normalized)
            channel_in = rest[..., 2 * self.n_heads :]
        else:
            channel_in = torch.cat([mixed_in, rest], dim=-1)  # z (after the convolution), f_c, i_c
        if self.channel_recurrence:
            z, f_c, i_c = channel_in.to(acc).chunk(3, dim=-1)
            log_gamma, one_minus_gamma = decay_gate(f_c, self.decay_lo)
            h, h_last = kernels.scan(log_gamma, one_minus_gamma * torch.sigmoid(i_c) * z,
                                     None if state is None else state.h)
            mixed = h if memory is None else mixed + h
        y = self.out_proj((mixed * F.silu(g.to(acc))).to(x.dtype))
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        position = 0 if state is None else state.position
        return x, BlockState(memory=memory, conv=conv_tail, h=h_last, position=position + T)

    def _read_memory(self, qkv: torch.Tensor, gates: torch.Tensor, state: BlockState | None, normalized: bool):
        """qkv [B, T, 3D] (q, k already L2-normalised per head if `normalized`), gates [B, T, 2H]
        (accumulation dtype) -> per-head-normed read [B, T, D], S_T."""
        B, T, _ = qkv.shape
        H, dh = self.n_heads, self.head_dim
        q, k, v = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [B, H, T, dh]
        if not normalized:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        f, b = gates.view(B, T, 2, H).permute(2, 0, 3, 1)  # each [B, H, T]
        log_alpha, _ = decay_gate(f, self.decay_lo)
        # The inputs are already fp32 (fp64 for a float64 model); autocast would run the op's matmuls in bf16.
        chunk = self.chunk_size or (32 if qkv.device.type == "cpu" else 64)
        with torch.autocast(qkv.device.type, enabled=False):
            o, memory = kernels.delta_rule(q, k, v, log_alpha, torch.sigmoid(b), None if state is None else state.memory,
                                           chunk_size=chunk)
        o = o.transpose(1, 2)  # [B, T, H, dh]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return o.reshape(B, T, H * dh) * self.out_norm_weight.to(o.dtype), memory
