"""The stage table: every training stage defined once.

    stage1       the base (one expert-shaped stack) on mixed text + code
    stage2-text  the text expert, initialised from the base, on text only
    stage2-code  the code expert, initialised from the base, on code only
    stage3       the fusion over both frozen experts, on mixed data (both domains in every batch)

Everything else (which model is built, what is frozen, which loader, the metric label, the export
kind, the presets a job starts from) reads this table instead of comparing stage-name strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DOMAINS = ("text", "code")


@dataclass(frozen=True)
class Stage:
    name: str
    trains: str  # "base" | "text" | "code" | "fusion": what the optimizer sees; also the metric label
    domains: tuple[str, ...]  # the data it trains and validates on
    every_batch_has_all_domains: bool  # stage 3 learns to combine the experts: both domains per batch
    init_keys: tuple[str, ...]  # run.<key> values it initialises from (exports or run:<name>)
    init_required: bool
    export_kind: str  # "expert" (one stack) | "mmrec" (the fused model)
    # DESIGN §4: lr, warmup, steps, sequence length and weight decay a job of this stage starts from.
    preset: dict[str, Any] = field(default_factory=dict)

    @property
    def expert(self) -> str | None:
        """The expert a stage-2 stage specialises (None for the base and the fusion)."""
        return self.trains if self.trains in DOMAINS else None


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("stage1", "base", DOMAINS, False, ("init_from",), False, "expert",
              dict(lr=3e-4, warmup_steps=5000, max_steps=100_000, seq_len=2048, weight_decay=0.1)),
        # Stage 2 fine-tunes an already trained stack, hence the lighter weight decay.
        Stage("stage2-text", "text", ("text",), False, ("init_from",), True, "expert",
              dict(lr=1e-4, warmup_steps=2000, max_steps=50_000, seq_len=8192, weight_decay=0.01)),
        Stage("stage2-code", "code", ("code",), False, ("init_from",), True, "expert",
              dict(lr=1e-4, warmup_steps=2000, max_steps=50_000, seq_len=8192, weight_decay=0.01)),
        # Stage 3 trains freshly initialised fusion weights, so it keeps the pre-training decay.
        Stage("stage3", "fusion", DOMAINS, True, ("init_from_text", "init_from_code"), True, "mmrec",
              dict(lr=5e-4, warmup_steps=1000, max_steps=20_000, seq_len=4096, weight_decay=0.1)),
    )
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        from core.configtree import ConfigError

        raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    return STAGES[name]
