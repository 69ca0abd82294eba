"""TrainConfig: the validated hyper-parameters of one training stage, and the stage presets.

Launchers build a config as `TrainConfig.for_stage("stage2-text").override("lr=5e-5", "max_steps=100")`;
every value can be changed, unknown keys are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

STAGES = ("stage1", "stage2-text", "stage2-code", "stage3")

# DESIGN.md §4. Stage 2 fine-tunes an already trained stack, hence the lighter weight decay;
# stage 3 trains freshly initialised fusion weights, so it keeps the pre-training value.
STAGE_PRESETS: dict[str, dict[str, typing.Any]] = {
    "stage1": dict(lr=3e-4, warmup_steps=5000, max_steps=100_000, seq_len=2048, weight_decay=0.1),
    "stage2-text": dict(lr=1e-4, warmup_steps=2000, max_steps=50_000, seq_len=8192, weight_decay=0.01),
    "stage2-code": dict(lr=1e-4, warmup_steps=2000, max_steps=50_000, seq_len=8192, weight_decay=0.01),
    "stage3": dict(lr=5e-4, warmup_steps=1000, max_steps=20_000, seq_len=4096, weight_decay=0.1),
}


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and says what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    # optimiser and schedule
    lr: float = 3e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still reported)
    # batch geometry: one optimizer step sees grad_accum_steps * micro_batch_size * seq_len tokens per rank
    grad_accum_steps: int = 1
    micro_batch_size: int = 8
    seq_len: int = 512
    # numerics and memory
    bf16: bool = False  # torch.autocast(bfloat16) around forward; loss and optimizer stay fp32
    activation_checkpointing: bool = False
    # validation, best model, early stopping
    eval_every: int = 100  # 0 disables periodic validation
    eval_batches: int = 8
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 disables
    early_stopping_min_delta: float = 0.0
    # checkpoints and logging
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 3  # >= 2 so a corrupt latest can fall back to the previous one
    log_every: int = 10
    seed: int = 0
    # fine-tuning options (stage 2)
    freeze_first_n_layers: int = 0
    lower_lr_first_n_layers: int = 0
    lower_lr_factor: float = 0.1  # lr multiplier of the first lower_lr_first_n_layers blocks

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"TrainConfig.{key}={getattr(self, key)!r}: {what}")

        for key in ("lr", "lower_lr_factor"):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key, "must be a finite number > 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas", "must be two numbers in [0, 1)"
        )
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        for key in ("max_steps", "grad_accum_steps", "micro_batch_size", "seq_len", "eval_batches", "log_every"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "must be an integer >= 1")
        for key in (
            "warmup_steps", "eval_every", "early_stopping_patience", "checkpoint_every",
            "freeze_first_n_layers", "lower_lr_first_n_layers", "seed",
        ):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "must be an integer >= 0")
        require(self.warmup_steps <= self.max_steps, "warmup_steps", f"must be <= max_steps ({self.max_steps})")
        require(self.keep_checkpoints >= 2, "keep_checkpoints", "must be >= 2 so a broken latest can fall back")
        require(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", "must be >= 0")
        require(
            self.early_stopping_patience == 0 or self.eval_every > 0,
            "early_stopping_patience", "needs eval_every > 0 (early stopping counts evaluations)",
        )
        require(
            not (self.freeze_first_n_layers and self.lower_lr_first_n_layers),
            "lower_lr_first_n_layers", "cannot be combined with freeze_first_n_layers; choose one",
        )

    # ---- construction paths used by launchers ----

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, typing.Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown TrainConfig key {key!r}; known keys: {', '.join(sorted(known))}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    @classmethod
    def for_stage(cls, stage: str, **overrides: typing.Any) -> TrainConfig:
        if stage not in STAGE_PRESETS:
            raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        return cls.from_dict({**STAGE_PRESETS[stage], **overrides})

    def to_dict(self) -> dict[str, typing.Any]:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)  # plain JSON / weights_only-safe container
        return values

    def replace(self, **changes: typing.Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def override(self, *assignments: str) -> TrainConfig:
        """Apply "key=value" strings (from a command line), parsing each value by the field's type."""
        hints = typing.get_type_hints(type(self))
        changes: dict[str, typing.Any] = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"override {assignment!r} is not of the form key=value")
            if key not in hints:
                raise ConfigError(f"unknown TrainConfig key {key!r} in override {assignment!r}")
            changes[key] = _parse_value(key, hints[key], text.strip())
        return self.replace(**changes)


def _parse_value(key: str, kind: typing.Any, text: str) -> typing.Any:
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            return tuple(float(part) for part in text.strip("()[] ").split(","))
    except ValueError as error:
        raise ConfigError(f"cannot parse {key}={text!r} as {getattr(kind, '__name__', kind)}: {error}") from None
    raise ConfigError(f"TrainConfig.{key} has type {kind}, which override() cannot parse")
