"""The fused MM-Rec model: a text expert, a code expert and the fusion layer over them (docs/design.md 3.3).

The fusion starts where the experts are. It mixes the experts' own predictive distributions with a
per-token gate over the two experts, in log space, and adds a learned correction:

    f        = RMSNorm(concat(f_text, f_code))                          [B, T, 2D]
    log g    = log_softmax(W_g f + c_g)                                  [B, T, 2], W_g = 0, c_g = 0 at init
    log p_e  = log_softmax(head_e(f_e))                                  each expert's own tied head
    log p_mix = logsumexp(log g_text + log p_text, log g_code + log p_code)
    out      = log_softmax(log p_mix + W_c2 silu(W_c1 f))                W_c2 = 0 at init

`out` is a normalised log-distribution, returned as the fused path's "logits": cross-entropy of it
is the NLL. At initialisation g = (1/2, 1/2) and the correction is zero, so out = log(p_text/2 + p_code/2)
>= (log p_text + log p_code) / 2 because log is concave (Jensen): on every token, hence on any batch,
the fused NLL starts at most at the mean of the experts' NLLs, and at least as good as the better
expert minus log 2. Stage 3 then learns the gate (which expert to trust where) and the correction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmrec.config import ModelConfig
from mmrec.model.expert import Expert
from mmrec.model.layers import RMSNorm
from mmrec.model.state import MMRecState

EXPERT_NAMES = ("text", "code")


class Fusion(nn.Module):
    """(text features, code features, text log-probs, code log-probs) -> fused log-probs [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, D, V = 2 * config.d_model, config.d_model, config.vocab_size
        self.norm = RMSNorm(width, config.norm_eps)
        self.gate = nn.Linear(width, len(EXPERT_NAMES))  # per-token mixture weights over the experts (log space)
        self.correction_in = nn.Linear(width, D, bias=False)
        self.correction_out = nn.Linear(D, V, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # the equal mixture
        nn.init.normal_(self.correction_in.weight, std=config.init_std)
        nn.init.zeros_(self.correction_out.weight)  # no correction at step 0

    def forward(
        self, text: torch.Tensor, code: torch.Tensor, text_log_probs: torch.Tensor, code_log_probs: torch.Tensor
    ) -> torch.Tensor:
        features = self.norm(torch.cat([text, code], dim=-1))  # [B, T, 2D]
        log_gate = F.log_softmax(self.gate(features).float(), dim=-1)  # [B, T, 2]
        mixture = torch.logaddexp(log_gate[..., :1] + text_log_probs.float(), log_gate[..., 1:] + code_log_probs.float())
        correction = self.correction_out(F.silu(self.correction_in(features)))  # [B, T, V]
        return F.log_softmax(mixture + correction.float(), dim=-1)

    def flops_per_token(self) -> float:
        """Training FLOPs per token of the fusion's own matmuls (3x forward). The experts' heads it mixes are
        counted with the experts (Expert.flops_per_token)."""
        weights = self.gate.weight.numel() + self.correction_in.weight.numel() + self.correction_out.weight.numel()
        return 3.0 * 2 * weights


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
        expert=None: both experts (each with its own embedding and head) mixed by the fusion layer, whose
        output is a normalised log-distribution (log-probabilities; cross-entropy of them is the NLL)."""
        if expert is not None and expert not in EXPERT_NAMES:
            raise ValueError(f"expert must be one of {EXPERT_NAMES} or None (fused path), got {expert!r}")
        if state is None:
            state = MMRecState()
        if not isinstance(state, MMRecState):
            raise TypeError(f"state must be an MMRecState (or None), got {type(state).__name__}")
        if expert is not None:
            logits, expert_state = self.experts[expert](ids, getattr(state, expert))
            return logits, MMRecState(**{**vars(state), expert: expert_state})
        features, log_probs, states = {}, {}, {}
        for name in EXPERT_NAMES:
            # Each expert's head is its own module's forward (the tied embedding), so ZeRO-3 gathers it there.
            features[name], states[name] = self.experts[name].features(ids, getattr(state, name))
            log_probs[name] = F.log_softmax(self.experts[name].head(features[name]).float(), dim=-1)
        fused = self.fusion(features["text"], features["code"], log_probs["text"], log_probs["code"])
        return fused, MMRecState(**states)

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
        """Approximate training FLOPs per token of the fused path with everything trainable: both experts
        (heads included: the fusion mixes their distributions) + the fusion's own matmuls."""
        return sum(e.flops_per_token(seq_len) for e in self.experts.values()) + self.fusion.flops_per_token()
