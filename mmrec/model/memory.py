"""Long-term segment memory of one MM-Rec block: multi-head read over S slots, gated write per segment.

Time is cut into segments of C tokens at absolute positions (0..C-1, C..2C-1, ...).
* Read: a token of segment s attends (H heads) over the S slots as they stood after segment s-1,
  so the cost is O(T*S) and the read is causal.
* Write: after segment s, slot j attends over that segment's h with its own learned query and
  M_s = lambda * M_{s-1} + (1 - lambda) * write_s, lambda = sigmoid(retain_logit) per slot.

The write queries are learned per slot rather than read from the slot contents. That keeps the
memory update linear in M, so all segments of a chunk are written in parallel and M is then one
scan over segments (the same kernels.scan as the token recurrence) instead of a Python loop with
a data dependency per segment: the same trade the token gates make (DESIGN.md 3.1).

The write softmax over a segment is kept as an online softmax (running max, normaliser, weighted
sum) in the state, so a chunk may end inside a segment and the next chunk finishes the write:
chunked runs equal whole runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from mmrec.model.layers import accumulation_dtype
from mmrec.model.state import BlockState


class SegmentMemory(nn.Module):
    def __init__(self, d_model: int, n_heads: int, slots: int, segment_len: int, init_std: float):
        super().__init__()
        self.d_model, self.n_heads, self.slots, self.segment_len = d_model, n_heads, slots, segment_len
        self.head_dim = d_model // n_heads
        self.read_query = nn.Linear(d_model, d_model, bias=False)
        self.read_key_value = nn.Linear(d_model, 2 * d_model, bias=False)
        self.write_key_value = nn.Linear(d_model, 2 * d_model, bias=False)
        self.write_query = nn.Parameter(torch.empty(slots, n_heads, self.head_dim))  # one query per slot and head
        self.initial_memory = nn.Parameter(torch.empty(slots, d_model))  # M_0
        self.retain_logit = nn.Parameter(torch.empty(slots))  # lambda = sigmoid(retain_logit)
        self.init_std = init_std
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        # Unit-variance queries give every slot a distinct preference over tokens from the start.
        nn.init.normal_(self.write_query, std=1.0)
        nn.init.normal_(self.initial_memory, std=self.init_std)
        # Slots retain from 0.5 to 0.99 per segment: a spread of time scales from 2 to 100 segments.
        retain = torch.linspace(0.5, 0.99, self.slots, device=self.retain_logit.device)
        self.retain_logit.copy_(torch.log(retain) - torch.log1p(-retain))

    def initial_accumulators(self, batch: int, dtype: torch.dtype, device: torch.device):
        """Empty online-softmax accumulators: max -inf (no token seen), normaliser 0, sum 0."""
        H, S, dh = self.n_heads, self.slots, self.head_dim
        return (
            torch.full((batch, H, S), float("-inf"), dtype=dtype, device=device),
            torch.zeros(batch, H, S, dtype=dtype, device=device),
            torch.zeros(batch, H, S, dh, dtype=dtype, device=device),
        )

    def forward(self, h: torch.Tensor, state: BlockState | None):
        """h [B, T, D]: the scan output of this chunk; state: the block state before it (None: a fresh sequence).

        Returns (read [B, T, D], memory [B, S, D], write_max, write_norm, write_sum) after this chunk.
        """
        B, T, D = h.shape
        H, S, dh, C = self.n_heads, self.slots, self.head_dim, self.segment_len
        acc = accumulation_dtype(h)
        if state is None:
            # M_0 is read here, inside this module's forward, like every other parameter: that is where
            # ZeRO-3 has gathered it. The expand keeps the gradient path to M_0.
            memory = self.initial_memory.to(acc).unsqueeze(0).expand(B, S, D)
            write_max, write_norm, write_sum = self.initial_accumulators(B, acc, h.device)
            position = 0
        else:
            memory, position = state.memory, state.position
            write_max, write_norm, write_sum = state.write_max, state.write_norm, state.write_sum

        # Lay the chunk out on the absolute segment grid: `offset` tokens of the first segment were in
        # earlier chunks (they live in the accumulators), the tail of the last segment is still to come.
        offset = position % C
        n_seg = -(-(offset + T) // C)
        pad_right = n_seg * C - offset - T
        h_grid = F.pad(h, (0, 0, offset, pad_right))  # [B, n_seg*C, D]
        valid = torch.zeros(n_seg * C, dtype=torch.bool, device=h.device)
        valid[offset : offset + T] = True
        valid = valid.view(n_seg, C)

        # --- write: per-segment partial softmax of each slot over the segment's tokens
        key, value = self.write_key_value(h_grid).view(B, n_seg, C, 2, H, dh).unbind(3)  # [B, n, C, H, dh]
        scores = torch.einsum("shd,bnchd->bnhsc", self.write_query.to(key.dtype), key).to(acc)
        scores = scores * (1.0 / math.sqrt(dh))
        scores = scores.masked_fill(~valid[None, :, None, None, :], float("-inf"))  # [B, n, H, S, C]
        # Every grid segment holds at least one token of this chunk, so the max is finite. It is detached:
        # it cancels between numerator and normaliser, so the gradient is exact without it.
        part_max = scores.amax(-1).detach()  # [B, n, H, S]
        weights = torch.exp(scores - part_max.unsqueeze(-1))
        part_norm = weights.sum(-1)  # [B, n, H, S]
        part_sum = torch.einsum("bnhsc,bnchd->bnhsd", weights, value.to(acc))  # [B, n, H, S, dh]

        # The first grid segment continues the accumulators carried in from the previous chunk.
        merged_max = torch.maximum(write_max, part_max[:, 0])
        carried_scale = torch.exp(write_max - merged_max)  # 0 when nothing was carried (max -inf)
        new_scale = torch.exp(part_max[:, 0] - merged_max)
        first_norm = write_norm * carried_scale + part_norm[:, 0] * new_scale
        first_sum = write_sum * carried_scale.unsqueeze(-1) + part_sum[:, 0] * new_scale.unsqueeze(-1)
        seg_max = torch.cat([merged_max.unsqueeze(1), part_max[:, 1:]], 1)
        seg_norm = torch.cat([first_norm.unsqueeze(1), part_norm[:, 1:]], 1)
        seg_sum = torch.cat([first_sum.unsqueeze(1), part_sum[:, 1:]], 1)

        # --- memory update over the segments that finish inside this chunk: M_j = lam*M_{j-1} + (1-lam)*write_j
        n_done = n_seg if pad_right == 0 else n_seg - 1
        if n_done > 0:
            write = (seg_sum[:, :n_done] / seg_norm[:, :n_done].unsqueeze(-1))  # [B, n_done, H, S, dh]
            write = write.permute(0, 1, 3, 2, 4).reshape(B, n_done, S, D)
            log_retain = F.logsigmoid(self.retain_logit.to(acc))  # [S]
            forget = torch.sigmoid(-self.retain_logit.to(acc))  # 1 - lambda, computed without cancellation
            drive = (forget[:, None] * write).reshape(B, n_done, S * D)
            log_a = log_retain[:, None].expand(S, D).reshape(1, 1, S * D).expand(B, n_done, S * D).contiguous()
            mem_after, mem_last = kernels.scan(log_a, drive, memory.reshape(B, S * D))
            mem_after = mem_after.view(B, n_done, S, D)
            # Grid segment j reads the memory as it stood after segment j-1.
            mem_before = torch.cat([memory.unsqueeze(1), mem_after[:, : n_seg - 1]], 1)  # [B, n_seg, S, D]
            new_memory = mem_last.view(B, S, D)
        else:
            mem_before = memory.unsqueeze(1)
            new_memory = memory

        if pad_right == 0:  # the chunk ends on a segment border: nothing is pending
            new_max, new_norm, new_sum = self.initial_accumulators(B, acc, h.device)
        else:
            new_max, new_norm, new_sum = seg_max[:, -1], seg_norm[:, -1], seg_sum[:, -1]

        # --- read: tokens of grid segment j attend over mem_before[j]; O(T*S)
        query = self.read_query(h_grid).view(B, n_seg, C, H, dh).permute(0, 1, 3, 2, 4)  # [B, n, H, C, dh]
        mem_key, mem_value = (
            self.read_key_value(mem_before.to(h_grid.dtype)).view(B, n_seg, S, 2, H, dh).permute(3, 0, 1, 4, 2, 5)
        )  # each [B, n, H, S, dh]
        read = F.scaled_dot_product_attention(
            query.reshape(B * n_seg, H, C, dh),
            mem_key.reshape(B * n_seg, H, S, dh).to(query.dtype),
            mem_value.reshape(B * n_seg, H, S, dh).to(query.dtype),
        )  # [B*n, H, C, dh]
        read = read.view(B, n_seg, H, C, dh).permute(0, 1, 3, 2, 4).reshape(B, n_seg * C, D)
        read = read[:, offset : offset + T]
        return read, new_memory, new_max, new_norm, new_sum
