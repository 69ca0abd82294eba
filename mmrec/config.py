"""Model configuration: one validated dataclass and the named presets (tiny, small, base, mmrec-100m)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one MM-Rec expert; the fused model is two such experts plus a fusion layer of width 2*d_model.

    Every field is validated on construction; an invalid value raises ValueError naming the field.
    """

    name: str = "custom"
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 12
    ffn_dim: int = 1024
    n_heads: int = 4  # heads of the associative memory; each holds a [D/H, D/H] matrix state
    conv_size: int = 4  # taps of the short causal depthwise convolution on q, k, v (0: none)
    memory: bool = True  # the associative memory; False is the ablation (the first design's channel recurrence instead)
    channel_recurrence: bool = False  # EXPERIMENT: also run the per-channel gated scan of the first design
    # Time steps per chunk of the chunk-parallel delta rule (Triton on GPU; the torch path on CPU for
    # non-fp32 dtypes, fp32 on CPU runs the step-by-step C kernel, which has no chunks): a speed knob,
    # results are equal for any value. 0 = by device: 32 on CPU, 64 on GPUs.
    chunk_size: int = 0
    seq_len: int = 2048  # training sequence length (the model itself runs any length)
    # Per-layer lower bound `lo` of the decay gate. (1 - lo) is spaced geometrically from the first to the
    # last layer, so time scales 1/(1-lo) grow exponentially with depth: short in the first, long in the last.
    decay_lo_first: float = 0.05
    decay_lo_last: float = 0.99
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{field.name} must be true or false, got {value!r}")
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"ModelConfig.{field.name} must be an int, got {value!r}")
            if field.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"ModelConfig.{field.name} must be a number, got {value!r}")
            if field.type == "float" and not math.isfinite(value):
                raise ValueError(f"ModelConfig.{field.name} must be finite, got {value!r}")
        for key in ("vocab_size", "d_model", "n_layers", "ffn_dim", "n_heads", "seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key} must be positive, got {getattr(self, key)}")
        for key, meaning in (("conv_size", "no convolution"), ("chunk_size", "chosen by device")):
            if getattr(self, key) < 0:
                raise ValueError(f"ModelConfig.{key} must be 0 ({meaning}) or positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"pick n_heads among the divisors of d_model"
            )
        for key in ("decay_lo_first", "decay_lo_last"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"ModelConfig.{key} must lie strictly between 0 and 1, got {getattr(self, key)}")
        if self.decay_lo_first > self.decay_lo_last:
            raise ValueError(
                f"ModelConfig.decay_lo_first ({self.decay_lo_first}) must not exceed decay_lo_last "
                f"({self.decay_lo_last}): upper layers keep the longer memory"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        for key in ("norm_eps", "init_std"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key} must be positive, got {getattr(self, key)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def decay_lower_bounds(self) -> list[float]:
        """`lo` of every layer, first to last (see decay_lo_first)."""
        if self.n_layers == 1:
            return [self.decay_lo_first]
        log_first, log_last = math.log1p(-self.decay_lo_first), math.log1p(-self.decay_lo_last)
        fractions = [i / (self.n_layers - 1) for i in range(self.n_layers)]
        return [-math.expm1(log_first + (log_last - log_first) * t) for t in fractions]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (e.g. a checkpoint or a YAML file); unknown keys are errors that name the key."""
        _check_keys(values)
        return cls(**values)

    def replace(self, **overrides: Any) -> "ModelConfig":
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)


def _check_keys(values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig key(s) {unknown}; valid keys are {sorted(known)}")


# tiny: CPU smoke tests, seconds per step on one core.
_TINY = ModelConfig(
    name="tiny", vocab_size=4096, d_model=64, n_layers=2, ffn_dim=256, n_heads=4,
    seq_len=128,
)
# small: CPU development and the benchmark; runs 32K tokens on a laptop.
_SMALL = ModelConfig(
    name="small", vocab_size=8192, d_model=256, n_layers=4, ffn_dim=1024, n_heads=4,
    seq_len=1024,
)
# base: the seed stage plan's expert shape (D 256, L 12, ffn 1024); 21.6M parameters with its embedding.
_BASE = ModelConfig(
    name="base", vocab_size=32000, d_model=256, n_layers=12, ffn_dim=1024, n_heads=4,
    seq_len=2048,
)
# mmrec-100m: two experts of this shape plus the fusion layer hold 101.0M parameters at V = 32000
# (each expert 46.3M including its 8.2M embedding; fusion 8.3M: the gate and the 2D -> D -> V correction).
_MMREC_100M = ModelConfig(
    name="mmrec-100m", vocab_size=32000, d_model=256, n_layers=20, ffn_dim=2048, n_heads=4,
    seq_len=4096,
)

_PRESETS: dict[str, ModelConfig] = {c.name: c for c in (_TINY, _SMALL, _BASE, _MMREC_100M)}
CONFIG_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A named preset (or a given config) with `overrides` applied; unknown names and keys are errors."""
    if isinstance(name, ModelConfig):
        base = name
    elif name in _PRESETS:
        base = _PRESETS[name]
    else:
        raise ValueError(f"unknown model config {name!r}; choose one of {list(CONFIG_NAMES)} or pass a ModelConfig")
    return base.replace(**overrides) if overrides else base
