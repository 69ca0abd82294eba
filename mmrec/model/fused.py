"""The fused MM-Rec model: a text expert, a code expert and the fusion layer with its LM head (DESIGN.md 3.3)."""
from __future__ import annotations

import torch
from torch import nn

from mmrec.config import ModelConfig
from mmrec.model.expert import Expert
from mmrec.model.layers import RMSNorm
from mmrec.model.state import MMRecState

EXPERT_NAMES = ("text", "code")


class Fusion(nn.Module):
    """concat(text, code) [B, T, 2D] -> value * sigmoid(gate) [B, T, 2D] -> RMSNorm -> head [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = 2 * config.d_model
        self.value = nn.Linear(width, width, bias=False)
        self.gate = nn.Linear(width, width, bias=False)
        self.norm = RMSNorm(width, config.norm_eps)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        for linear in (self.value, self.gate, self.head):
            nn.init.normal_(linear.weight, std=config.init_std)

    def forward(self, text: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        both = torch.cat([text, code], dim=-1)
        return self.head(self.norm(self.value(both) * torch.sigmoid(self.gate(both))))

    def flops_per_token(self) -> float:
        """Training FLOPs per token (3x the forward matmuls)."""
        return 3.0 * 2 * sum(linear.weight.numel() for linear in (self.value, self.gate, self.head))


class MMRec(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleDict({name: Expert(config) for name in EXPERT_NAMES})
        self.fusion = Fusion(config)

    def forward(
        self, ids: torch.Tensor, expert: str | None = None, state: MMRecState | None = None
    ) -> tuple[torch.Tensor, MMRecState]:
        """ids [B, T] -> logits [B, T, V]. expert="text"/"code": that expert alone through its tied head;
        expert=None: both experts (each with its own embedding) and the fusion layer."""
        if expert is not None and expert not in EXPERT_NAMES:
            raise ValueError(f"expert must be one of {EXPERT_NAMES} or None (fused path), got {expert!r}")
        if state is None:
            state = MMRecState()
        if not isinstance(state, MMRecState):
            raise TypeError(f"state must be an MMRecState (or None), got {type(state).__name__}")
        if expert is not None:
            logits, expert_state = self.experts[expert](ids, getattr(state, expert))
            return logits, MMRecState(**{**vars(state), expert: expert_state})
        text, text_state = self.experts["text"].features(ids, state.text)
        code, code_state = self.experts["code"].features(ids, state.code)
        return self.fusion(text, code), MMRecState(text=text_state, code=code_state)

    @torch.no_grad()
    def init_experts_from_base(self, base_state_dict: dict[str, torch.Tensor]) -> None:
        """Stage 2/3 init: copy the base (an Expert's state_dict) into both experts; shapes must match exactly."""
        for name, expert in self.experts.items():
            try:
                expert.load_state_dict(base_state_dict, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"the base state_dict does not fit expert {name!r} of config {self.config.name!r}: {err}"
                ) from None

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training FLOPs per token of the fused path (both experts without their heads + fusion)."""
        expert_head = 3.0 * 2 * self.config.d_model * self.config.vocab_size
        return sum(e.flops_per_token(seq_len) - expert_head for e in self.experts.values()) + self.fusion.flops_per_token()
