"""Naive MM-Rec block: token-by-token loops straight from the equations, in float64. Ground truth for tests.

It shares nothing with the vectorised path except the weights: no segment grid, no online softmax,
no scan kernel. A segment's write is a plain softmax over its tokens, applied when the segment ends.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmrec.model.block import MMRecBlock


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def block_reference(block: MMRecBlock, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] from position 0 with a fresh state -> block output [B, T, D] (float64)."""
    p = {name: t.detach().double() for name, t in block.named_parameters()}
    mem = block.memory
    eps = block.in_norm.eps
    B, T, D = x.shape
    H, S, dh, C = mem.n_heads, mem.slots, mem.head_dim, mem.segment_len
    x = x.double()
    lo = block.decay_lo
    retain = torch.sigmoid(p["memory.retain_logit"])  # [S]

    h = torch.zeros(B, D, dtype=torch.float64)
    memory = p["memory.initial_memory"].expand(B, S, D).clone()
    segment_h: list[torch.Tensor] = []
    outputs = []
    for t in range(T):
        u = _rms_norm(x[:, t], p["in_norm.weight"], eps)
        z, f, g, o = (u @ p["in_proj.weight"].T).chunk(4, dim=-1)
        gamma = lo + (1 - lo) * torch.sigmoid(f)
        h = gamma * h + (1 - gamma) * torch.sigmoid(g) * z

        # read: this token's query over the slots as they stood after the previous segment
        q = (h @ p["memory.read_query.weight"].T).view(B, H, dh)
        k, v = (memory @ p["memory.read_key_value.weight"].T).view(B, S, 2, H, dh).unbind(2)  # [B, S, H, dh]
        attn = torch.softmax(torch.einsum("bhd,bshd->bhs", q, k) / math.sqrt(dh), dim=-1)
        read = torch.einsum("bhs,bshd->bhd", attn, v).reshape(B, D)

        y = ((h + read) * F.silu(o)) @ p["out_proj.weight"].T
        xt = x[:, t] + y
        gate, up = (_rms_norm(xt, p["ffn_norm.weight"], eps) @ p["ffn.gate_up.weight"].T).chunk(2, dim=-1)
        outputs.append(xt + (F.silu(gate) * up) @ p["ffn.down.weight"].T)

        segment_h.append(h)
        if (t + 1) % C == 0:  # segment finished: every slot attends over its tokens, then the gated write
            hs = torch.stack(segment_h, 1)  # [B, C, D]
            wk, wv = (hs @ p["memory.write_key_value.weight"].T).view(B, C, 2, H, dh).unbind(2)
            scores = torch.einsum("shd,bchd->bhsc", p["memory.write_query"], wk) / math.sqrt(dh)
            write = torch.einsum("bhsc,bchd->bshd", torch.softmax(scores, -1), wv).reshape(B, S, D)
            memory = retain[:, None] * memory + (1 - retain[:, None]) * write
            segment_h = []
    return torch.stack(outputs, 1)
