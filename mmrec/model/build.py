"""Constructors by config name, and parameter counting."""
from __future__ import annotations

from typing import Any

from torch import nn

from mmrec.config import ModelConfig, get_config
from mmrec.model.expert import Expert
from mmrec.model.fused import MMRec


def build_base(config: str | ModelConfig = "tiny", **overrides: Any) -> Expert:
    """The stage-1 base: one expert-shaped stack with its tied head."""
    return Expert(get_config(config, **overrides))


def build_model(config: str | ModelConfig = "tiny", **overrides: Any) -> MMRec:
    """The full model: text and code experts plus the fusion layer."""
    return MMRec(get_config(config, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
