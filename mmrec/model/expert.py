"""An expert (and the stage-1 base): token embedding, L MM-Rec blocks, final RMSNorm, tied LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmrec.config import ModelConfig
from mmrec.model.block import MMRecBlock
from mmrec.model.layers import RMSNorm
from mmrec.model.state import BlockState, ExpertState


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        got = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"token ids must be a LongTensor [batch, time], got a {got}")
    if ids.shape[1] == 0:
        raise ValueError("token ids have no time steps (shape [B, 0]); pass at least one token")
    # The range check reads the values, which would stall a GPU stream every step; on CUDA an
    # out-of-range id trips the embedding's device assert instead.
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (vocab_size), got values in [{int(ids.min())}, {int(ids.max())}]; "
            f"check that the tokenizer matches the model config"
        )


class TiedEmbedding(nn.Embedding):
    """Token embedding that is also the LM head: forward(ids) looks tokens up, forward(x, as_head=True)
    gives x @ weight^T. Both go through this module's forward so hooks that gather or shard its
    weight (ZeRO-3, FSDP) see every use of it."""

    def forward(self, inputs: torch.Tensor, as_head: bool = False) -> torch.Tensor:
        if as_head:
            return F.linear(inputs, self.weight)  # [B, T, D] -> [B, T, V]
        return super().forward(inputs)  # [B, T] -> [B, T, D]


class Expert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = TiedEmbedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MMRecBlock(config, lo) for lo in config.decay_lower_bounds())
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.gradient_checkpointing = False
        self._last_states: list[BlockState] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        for block in self.blocks:
            for linear in (block.in_proj, block.memory.read_query, block.memory.read_key_value,
                           block.memory.write_key_value, block.ffn.gate_up):
                nn.init.normal_(linear.weight, std=std)
            # Residual-branch outputs shrink with depth so the residual stream's variance stays O(1) (GPT-2).
            for linear in (block.out_proj, block.ffn.down):
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def _check_state(self, state: ExpertState, batch: int) -> None:
        if not isinstance(state, ExpertState):
            raise TypeError(f"state must be an ExpertState (or None for a fresh sequence), got {type(state).__name__}")
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers but this expert has {len(self.blocks)}; "
                             "it belongs to a different config")
        if state.batch_size != batch:
            raise ValueError(f"state was built for batch size {state.batch_size}, the input has {batch} rows")

    def features(self, ids: torch.Tensor, state: ExpertState | None = None) -> tuple[torch.Tensor, ExpertState]:
        """Final-normed hidden states [B, T, D] (what the head and the fusion layer read) and the new state."""
        check_token_ids(ids, self.config.vocab_size)
        if state is not None:
            self._check_state(state, ids.shape[0])
        layer_states = [None] * len(self.blocks) if state is None else state.layers
        x = self.embedding(ids)  # [B, T, D]
        new_states = []
        for block, block_state in zip(self.blocks, layer_states):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, block_state = checkpoint(block, x, block_state, use_reentrant=False)
            else:
                x, block_state = block(x, block_state)
            new_states.append(block_state)
        # Only references are kept: norms are computed when someone asks (state_norms), not every step.
        self._last_states = [s.detach() for s in new_states]
        return self.norm(x), ExpertState(new_states)

    def forward(self, ids: torch.Tensor, state: ExpertState | None = None) -> tuple[torch.Tensor, ExpertState]:
        """ids [B, T] -> logits [B, T, V] through the tied head, and the state after the last token."""
        features, state = self.features(ids, state)
        return self.embedding(features, as_head=True), state

    def state_norms(self) -> tuple[list[float], list[float]]:
        """Per layer, from the last forward: batch mean of ||h_T||_2 and of the memory's Frobenius norm ||M||_F."""
        if self._last_states is None:
            raise RuntimeError("state_norms() needs a forward pass first")
        h_norms = torch.stack([s.h.float().norm(dim=-1).mean() for s in self._last_states])
        memory_norms = torch.stack([s.memory.float().flatten(1).norm(dim=-1).mean() for s in self._last_states])
        return h_norms.tolist(), memory_norms.tolist()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training FLOPs per token (forward + backward = 3x forward), for MFU estimates.

        Counts the matmuls: 2 FLOPs per weight per token for every block projection and the tied head,
        plus the memory attention (read: scores and values over S slots; write: scores and values of S
        slots over the token). Elementwise work (gates, norms, scan) is left out. Unlike attention, the
        cost does not grow with seq_len; the argument exists to match transformer MFU helpers.
        """
        c = self.config
        D, F_, S, V = c.d_model, c.ffn_dim, c.memory_slots, c.vocab_size
        block_weights = 4 * D * D + D * D + D * D + 2 * D * D + 2 * D * D + 3 * D * F_
        memory_attention = 2 * S * D + 2 * S * D  # read (q.k and p.v) + write (per token share)
        forward = c.n_layers * (2 * block_weights + 2 * memory_attention) + 2 * D * V
        return 3.0 * forward
