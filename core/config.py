"""The one config tree of the project: every launcher reads its sections from it.

A config is a TOML file (configs/*.toml) plus `--set section.key=value` overrides:

    stage = "stage1"            the training stage (launchers.train; --stage)
    [model]                     name = "tiny" and any mmrec.ModelConfig field as an override
    [train]                     optimiser, schedule, batch geometry, precision, validation, checkpoints
    [data]                      the prepared dataset (manifest.json) and its order
    [run]                       where the run lives (storage_path/name), what it starts from, records
    [engine]                    "torch" (one process) or "deepspeed" (Ray Train workers, ZeRO 0-3)
    [scaling]                   workers, CPUs per worker, GPUs
    [fault_tolerance]           restarts, the step watchdog, NaN rollbacks
    [fault]                     injected faults for tests and drills (never in real runs)
    [metrics]                   the Prometheus exporter and the MFU peak
    [ray]                       which cluster, connection and scheduling deadlines
    [prep]                      launchers.prep: sources, tokenizer, shards
    [pipeline]                  launchers.pipeline: the whole run and its checks
    [generate], [eval]          launchers.generate / launchers.eval
    [stages.<stage>.<section>]  values that apply to one stage only (e.g. stage 2's lr)

Resolution for a stage: field defaults < the stage's preset (core.stages) < the file's sections <
the file's [stages.<stage>] tables < --set. Unknown sections and keys are errors that name them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.configtree import ConfigError, apply_overrides, build, check_keys, merge, read_toml, to_dict
from core.sections import (  # noqa: F401 (the sections are part of this module's interface)
    MIN_VOCAB_SIZE, DataConfig, EngineConfig, EvalConfig, FaultInjection, FaultToleranceConfig, GenerateConfig,
    MetricsConfig, PipelineConfig, PrepConfig, RayConfig, RunConfig, ScalingConfig, TrainConfig, _require,
)
from core.stages import STAGE_NAMES, STAGES, get_stage


@dataclass(frozen=True)
class Config:
    stage: str = ""  # a training stage of core.stages ("" outside training launchers)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "tiny"})
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    fault: FaultInjection = field(default_factory=FaultInjection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # [stages.<stage>.<section>] tables

    def __post_init__(self) -> None:
        _require(self.stage in ("", *STAGE_NAMES), f"stage={self.stage!r}: choose one of {', '.join(STAGE_NAMES)}")
        _require(isinstance(self.model.get("name", "tiny"), str), "model.name must be a string (a preset name)")
        _require("seq_len" not in self.model,
                 "model.seq_len: the model's training length is train.seq_len; set that instead")
        for name, table in self.stages.items():
            _require(name in STAGES, f"[stages.{name}]: unknown stage; choose among {', '.join(STAGE_NAMES)}")
            _require(isinstance(table, Mapping) and "stage" not in table and "stages" not in table,
                     f"[stages.{name}] holds section tables ([stages.{name}.train] ...), not {table!r}")
            check_keys(Config, table, f"stages.{name}")  # unknown keys are named now, values when used
        if self.engine.kind == "torch":
            _require(self.scaling.num_workers == 1 and not self.scaling.elastic,
                     "engine.kind='torch' runs one process: set scaling.num_workers=1, or engine.kind='deepspeed' "
                     "for a Ray Train job of several workers")
        if self.scaling.elastic:
            for workers in range(self.scaling.min_workers, self.scaling.num_workers + 1):
                self.grad_accum_steps_for(workers)  # every admissible size must keep the global batch
        if self.stage == "stage3":
            _require(not (self.train.freeze_first_n_layers or self.train.lower_lr_first_n_layers),
                     "stage3 keeps both experts frozen: train.freeze_first_n_layers and "
                     "train.lower_lr_first_n_layers must be 0")

    # ---- derived values ----

    @property
    def model_name(self) -> str:
        return self.model.get("name", "tiny")

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    @property
    def run_name(self) -> str:
        return self.run.name or self.stage

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, fixed by the nominal worker count so a resize keeps it."""
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.scaling.num_workers

    def grad_accum_steps_for(self, world_size: int) -> int:
        per_micro_step = self.train.micro_batch_size * world_size
        _require(self.global_batch_size % per_micro_step == 0,
                 f"global batch {self.global_batch_size} (train.micro_batch_size {self.train.micro_batch_size} x "
                 f"train.grad_accum_steps {self.train.grad_accum_steps} x scaling.num_workers "
                 f"{self.scaling.num_workers}) is not divisible by micro_batch_size x {world_size} workers; "
                 "choose scaling.min_workers/num_workers so it is")
        return self.global_batch_size // per_micro_step

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections replaced, or with section fields changed: replace(run={"name": "x"})."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        return build(cls, values)


def resolve(values: Mapping[str, Any], *, stage: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The Config of a plain document (a parsed TOML file), for `stage` when given, with overrides."""
    values = dict(values)
    if stage is not None:
        _require(values.get("stage") in (None, "", stage),
                 f"--stage {stage} contradicts stage = {values.get('stage')!r} in the config file")
        values["stage"] = stage
    # --set stages.<stage>.* edits the per-stage tables before they are merged; every other
    # assignment applies after the merge, so the command line wins over the file.
    staged = [a for a in overrides if a.strip().startswith("stages.")]
    plain = [a for a in overrides if not a.strip().startswith("stages.")]
    values = apply_overrides(Config, values, [*staged, *[a for a in plain if a.strip().startswith("stage=")]])
    chosen = values.get("stage") or ""
    if chosen:
        get_stage(chosen)  # names the stage if it is unknown
        tables = values.get("stages", {})
        if not isinstance(tables, Mapping):
            raise ConfigError("[stages] must hold one table per stage: [stages.stage2-text.train] ...")
        values = merge({"train": STAGES[chosen].preset}, values)
        values = merge(values, tables.get(chosen, {}))
    values = apply_overrides(Config, values, [a for a in plain if not a.strip().startswith("stage=")])
    if isinstance(values.get("model", {}), Mapping):
        values["model"] = {"name": "tiny", **values.get("model", {})}
    return build(Config, values)


def load_config(path: str | os.PathLike | None = None, *, stage: str | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config (defaults when path is None), resolve it for `stage`, apply overrides."""
    values = read_toml(path) if path is not None else {}
    return resolve(values, stage=stage, overrides=overrides)


def toml_text(values: Mapping[str, Any], sections: Sequence[str] | None = None) -> str:
    """A TOML document of `values` (what --print-config prints; it loads back with load_config)."""
    lines: list[str] = []
    scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        nested = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        if plain or not nested:
            lines.append("")
            lines.append(f"[{prefix}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items())
        for key, sub in nested.items():
            table(f"{prefix}.{_toml_key(key)}", sub)

    for key, value in values.items():
        if isinstance(value, Mapping) and (sections is None or key in sections) and (value or key != "stages"):
            table(_toml_key(key), value)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def resolve_path(path: str, base: str | os.PathLike | None = None) -> str:
    """A local path made absolute against `base` (the caller's directory); URLs and '' unchanged."""
    if not path or "://" in path or path.startswith("run:"):
        return path
    return str((Path(base or os.getcwd()) / Path(path).expanduser()).resolve())
