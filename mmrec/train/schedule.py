"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio of the peak."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr used for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, reaching 1.0 on the last warmup step so no step runs at lr 0.
    Then cosine from 1.0 at step warmup_steps to min_lr_ratio at step max_steps (held after it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """Picklable-as-plain-data callable for LambdaLR: its __dict__ is what LambdaLR.state_dict() saves."""

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_multiplier(
            step, warmup_steps=self.warmup_steps, max_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio
        )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group; each group's own lr (e.g. a lower-LR group) is its peak."""
    schedule = WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
