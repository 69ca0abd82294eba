"""Naive MM-Rec block: a token-by-token loop straight from the equations, in float64. Ground truth for tests.

It shares nothing with the vectorised path except the weights: no chunking, no kernels, the short
convolution as an explicit sum over past inputs, the matrix state updated one token at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmrec.model.block import MMRecBlock


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def block_reference(block: MMRecBlock, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] from position 0 with a fresh state -> block output [B, T, D] (float64)."""
    p = {name: t.detach().double() for name, t in block.named_parameters()}
    eps = block.in_norm.eps
    B, T, D = x.shape
    H, dh, lo = block.n_heads, block.head_dim, block.decay_lo
    x = x.double()
    S = torch.zeros(B, H, dh, dh, dtype=torch.float64)  # [B, H, Dv, Dk]
    h = torch.zeros(B, D, dtype=torch.float64)
    projected = [_rms_norm(x[:, t], p["in_norm.weight"], eps) @ p["in_proj.weight"].T for t in range(T)]
    width = 3 * D if block.memory else D  # what the convolution sees: q, k, v (or z in the ablation)
    outputs = []
    for t in range(T):
        mixed_in = projected[t][:, :width]
        if block.conv is not None:  # y_t = sum_j w_j u_{t-K+1+j}, zeros before the sequence
            K = block.conv.taps
            mixed_in = F.silu(sum(
                projected[t - K + 1 + j][:, :width] * p["conv.weight"][:, j] for j in range(K) if t - K + 1 + j >= 0
            ))
        g = projected[t][:, width : width + D]
        mixed = torch.zeros(B, D, dtype=torch.float64)
        if block.memory:
            q, k, v = mixed_in.view(B, 3, H, dh).unbind(1)  # [B, H, dh]
            q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            f, b = projected[t][:, 4 * D : 4 * D + 2 * H].view(B, 2, H).unbind(1)  # [B, H]
            a = (lo + (1 - lo) * torch.sigmoid(f))[:, :, None, None]
            beta = torch.sigmoid(b)[:, :, None, None]
            eye = torch.eye(dh, dtype=torch.float64)
            S = a * S @ (eye - beta * k[..., :, None] * k[..., None, :]) + beta * v[..., :, None] * k[..., None, :]
            o = (S @ q[..., None])[..., 0]  # [B, H, dh]
            o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps)
            mixed = o.reshape(B, D) * p["out_norm_weight"]
            channel = projected[t][:, 4 * D + 2 * H :]
        else:
            channel = torch.cat([mixed_in, projected[t][:, 2 * D :]], dim=-1)
        if block.channel_recurrence:
            z, f_c, i_c = channel.chunk(3, dim=-1)
            gamma = lo + (1 - lo) * torch.sigmoid(f_c)
            h = gamma * h + (1 - gamma) * torch.sigmoid(i_c) * z
            mixed = mixed + h
        y = (mixed * F.silu(g)) @ p["out_proj.weight"].T
        xt = x[:, t] + y
        gate, up = (_rms_norm(xt, p["ffn_norm.weight"], eps) @ p["ffn.gate_up.weight"].T).chunk(2, dim=-1)
        outputs.append(xt + (F.silu(gate) * up) @ p["ffn.down.weight"].T)
    return torch.stack(outputs, 1)
