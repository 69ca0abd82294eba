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
            for linear in (block.in_proj, block.ffn.gate_up):
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

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., D] -> logits [..., V] through the tied embedding (the embedding module's own forward)."""
        return self.embedding(features, as_head=True)

    def forward(self, ids: torch.Tensor, state: ExpertState | None = None) -> tuple[torch.Tensor, ExpertState]:
        """ids [B, T] -> logits [B, T, V] through the tied head, and the state after the last token."""
        features, state = self.features(ids, state)
        return self.head(features), state

    def state_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer, from the last forward: ([L] batch mean of the whole recurrent state's norm, i.e. of every
        tensor the block carries to the next token taken together, [L] batch mean of the associative memory's
        Frobenius norm ||S||_F over all heads). Detached tensors on the model's device: the training loop
        stacks them with its other per-step numbers and reads everything in one host sync."""
        if self._last_states is None:
            raise RuntimeError("state_norms() needs a forward pass first")
        state_norms, memory_norms = [], []
        for s in self._last_states:
            squares = [t.float().flatten(1).square().sum(-1) for t in (s.memory, s.conv, s.h) if t is not None]
            state_norms.append(torch.stack(squares).sum(0).sqrt().mean())
            memory = s.memory if s.memory is not None else torch.zeros(1, 1, device=squares[0].device)
            memory_norms.append(memory.float().flatten(1).norm(dim=-1).mean())
        return torch.stack(state_norms), torch.stack(memory_norms)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training FLOPs per token (forward + backward = 3x forward), for MFU estimates.

        Counts the matmuls: 2 FLOPs per weight per token for every block projection and the tied head, plus
        the chunked delta rule per head (dh = D/H, chunk C): the intra-chunk products K K^T, Q K^T, the
        triangular solve for [U~, W] (2dh right-hand sides) and (D*QK^T) U, each ~2 C dh per token, and the
        three state products Q S, W S, K^T U, each 2 dh^2 per token. Elementwise work (gates, norms, the
        convolution) is left out. The cost does not grow with seq_len; the argument exists to match
        transformer MFU helpers.
        """
        c = self.config
        D, F_, V, H = c.d_model, c.ffn_dim, c.vocab_size, c.n_heads
        dh = D // H
        C = c.chunk_size or (32 if self.embedding.weight.device.type == "cpu" else 64)  # as MMRecBlock chooses
        if c.memory:
            in_width = 4 * D + 2 * H + (3 * D if c.channel_recurrence else 0)
            delta_rule = H * (2 * C * dh * 4 + 2 * dh * dh * 3)
        else:
            in_width, delta_rule = 4 * D, 0
        block_weights = D * in_width + D * D + 3 * D * F_
        forward = c.n_layers * (2 * block_weights + delta_rule) + 2 * D * V
        return 3.0 * forward
