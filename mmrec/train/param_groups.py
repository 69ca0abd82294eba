"""AdamW parameter groups: weight decay, frozen layers and lower-LR layers.

Decay policy: matrices (dim >= 2: projections, the embedding which is also the tied head, memory
slots) are decayed; vectors and scalars (norm gains, biases, gate offsets, per-slot lambdas) are
not, because shrinking them towards 0 changes what a layer computes instead of regularising it.
Parameters with requires_grad=False (frozen by the stage) are left out of every group.
"""
from __future__ import annotations

import re

from torch import nn

_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def block_index(parameter_name: str) -> int | None:
    """Index of the MM-Rec block a parameter lives in ("experts.text.blocks.3.w" -> 3), None outside blocks."""
    match = _BLOCK_INDEX.search(parameter_name)
    return int(match.group(1)) if match else None


def build_param_groups(model: nn.Module, cfg, *, lr_scale: float = 1.0) -> list[dict]:
    """Groups for torch.optim.AdamW: (decay | no decay) x (normal lr | lr * lower_lr_factor).

    Each group carries a "name" so logs and tests can tell them apart, and its peak lr ("peak_lr":
    cfg.lr x lr_scale x its factor) that the schedule multiplies every step; empty groups are dropped.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = block_index(name)
        lower = layer is not None and layer < cfg.lower_lr_first_n_layers
        decay = parameter.dim() >= 2
        groups.setdefault((decay, lower), []).append(parameter)
    result = []
    for (decay, lower), params in sorted(groups.items()):
        result.append(
            dict(
                name=f"{'decay' if decay else 'no_decay'}{'_lower_lr' if lower else ''}",
                params=params,
                weight_decay=cfg.weight_decay if decay else 0.0,
                lr=cfg.lr * lr_scale * (cfg.lower_lr_factor if lower else 1.0),
                peak_lr=cfg.lr * lr_scale * (cfg.lower_lr_factor if lower else 1.0),
            )
        )
    if not result:
        raise ValueError("build_param_groups: the model has no trainable parameters (is everything frozen?)")
    return result
