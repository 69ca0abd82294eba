"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio of the peak.

A pure function of the step and the config, not optimizer state: the loop sets every parameter
group's lr to its peak x lr_multiplier(step) before each optimizer step, so a resumed run with a
changed lr, warmup or max_steps follows the new schedule from the step it resumes at.
"""
from __future__ import annotations

import math


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
