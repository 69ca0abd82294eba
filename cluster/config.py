"""JobConfig: everything one distributed stage run needs, validated before anything starts.

A job config is a TOML file (see configs/) with sections, plus `section.key=value` overrides from
the command line:

    stage = "stage1"              # or given by --stage
    model = "tiny"                # a preset of mmrec.get_config
    [model_overrides]  seq_len = 64
    [train]            mmrec.train.TrainConfig fields (lr, max_steps, micro_batch_size, ...)
    [data]             manifest = "runs/data/manifest.json"
    [zero]             stage = 2, offload_optimizer = true, offload_param = false
    [scaling]          num_workers = 2, min_workers = 0, cpus_per_worker = 1, use_gpu = false
    [fault_tolerance]  max_failures = 2, step_timeout_s = 600, nan_max_rollbacks = 3, nan_lr_factor = 0.5
    [fault]            test-only fault injection: fail_at_step, kill_at_step, hang_at_step, nan_at_steps
    [run]              storage_path, name, init_from, init_from_text, init_from_code, metrics_port

Unknown sections and keys are errors that name them. The whole config travels to the Ray workers
as a plain dict (to_dict/from_dict) and is stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrec import get_config
from mmrec.train import STAGES, ConfigError, TrainConfig


@dataclass(frozen=True)
class ZeroOptions:
    stage: int = 2  # ZeRO stage 0 (plain data parallel), 1, 2 or 3
    offload_optimizer: bool = False  # optimizer states and step on the CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # parameters on the CPU between uses; DeepSpeed allows it with stage 3 only

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage={self.stage!r}: must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("zero.offload_optimizer=true needs zero.stage >= 1 (stage 0 keeps the optimizer on each rank)")
        if self.offload_param and self.stage != 3:
            raise ConfigError(f"zero.offload_param=true needs zero.stage=3 (got {self.stage}): DeepSpeed offloads parameters only in stage 3")


@dataclass(frozen=True)
class ScalingOptions:
    num_workers: int = 2  # the nominal (and maximum) number of workers; fixes the global batch
    min_workers: int = 0  # > 0 makes the run elastic: Ray Train may run it with min_workers..num_workers
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # GPU workers talk over NCCL, CPU workers over gloo

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers={self.num_workers!r}: must be an integer >= 1")
        if not isinstance(self.min_workers, int) or not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"scaling.min_workers={self.min_workers!r}: must be 0 (fixed size) or 1..num_workers ({self.num_workers})"
            )
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"scaling.cpus_per_worker={self.cpus_per_worker!r}: must be > 0")

    @property
    def elastic(self) -> bool:
        return self.min_workers > 0 and self.min_workers < self.num_workers


@dataclass(frozen=True)
class FaultTolerance:
    max_failures: int = 2  # worker/node failures Ray Train restarts from the last checkpoint
    step_timeout_s: float = 600.0  # a training step slower than this fails the attempt (hang watchdog)
    nan_max_rollbacks: int = 3  # NaN/Inf loss rollbacks before the run fails
    nan_lr_factor: float = 0.5  # the lr is multiplied by this on every rollback

    def __post_init__(self) -> None:
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"fault_tolerance.max_failures={self.max_failures!r}: must be >= 0 (-1: unlimited)")
        if not self.step_timeout_s > 0:
            raise ConfigError(f"fault_tolerance.step_timeout_s={self.step_timeout_s!r}: must be > 0 seconds")
        if not isinstance(self.nan_max_rollbacks, int) or self.nan_max_rollbacks < 0:
            raise ConfigError(f"fault_tolerance.nan_max_rollbacks={self.nan_max_rollbacks!r}: must be an integer >= 0")
        if not 0 < self.nan_lr_factor < 1:
            raise ConfigError(f"fault_tolerance.nan_lr_factor={self.nan_lr_factor!r}: must be in (0, 1)")


@dataclass(frozen=True)
class FaultInjection:
    """Faults a real component cannot produce on demand, injected at a given optimizer step.

    This is the one sanctioned "mock" of the project: tests and drills use it to prove the recovery
    paths. Step-type faults fire on the first attempt only (a marker in the run's storage records
    that they fired), so the restarted run can pass the same step.
    """

    fail_at_step: int = 0  # a worker raises during this step
    kill_at_step: int = 0  # a worker process kills itself (SIGKILL) during this step
    hang_at_step: int = 0  # a worker sleeps forever in this step (the watchdog must end the attempt)
    fault_rank: int = -1  # which rank misbehaves; -1: the last rank
    nan_at_steps: tuple[int, ...] = ()  # the loss of these steps becomes NaN ...
    nan_times: int = 1  # ... this many times per listed step (more than nan_max_rollbacks: the run must fail)

    def __post_init__(self) -> None:
        for key in ("fail_at_step", "kill_at_step", "hang_at_step", "nan_times"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"fault.{key}={getattr(self, key)!r}: must be an integer >= 0 (0: off)")
        if any(not isinstance(s, int) or s < 1 for s in self.nan_at_steps):
            raise ConfigError(f"fault.nan_at_steps={self.nan_at_steps!r}: must be optimizer steps >= 1")

    @property
    def any_step_fault(self) -> bool:
        return bool(self.fail_at_step or self.kill_at_step or self.hang_at_step)


@dataclass(frozen=True)
class DataOptions:
    manifest: str = ""  # manifest.json of a prepared dataset (path or s3://), from datasets_prep
    seed: int = 0  # the global sample order depends only on (seed, epoch)
    on_corrupt: str = "raise"  # "raise" or "skip" a corrupt shard

    def __post_init__(self) -> None:
        if self.on_corrupt not in ("raise", "skip"):
            raise ConfigError(f"data.on_corrupt={self.on_corrupt!r}: must be 'raise' or 'skip'")


@dataclass(frozen=True)
class RunOptions:
    storage_path: str = "runs/cluster"  # local directory or s3://bucket/prefix shared by all workers
    name: str = ""  # run name under storage_path; default "<stage>"
    # An export directory (path or s3://), or "run:<name>": the export of the newest complete checkpoint
    # of run <name> under the same storage_path, so stage jobs chain without knowing checkpoint names.
    init_from: str = ""  # stage2-*: the stage-1 export; stage1: optional export to continue from
    init_from_text: str = ""  # stage3: the stage-2 text export
    init_from_code: str = ""  # stage3: the stage-2 code export
    metrics: bool = True  # serve Prometheus metrics from every worker
    metrics_port: int = 9400  # first port tried (the exporter searches upwards)
    record_sample_digests: bool = False  # log a digest of every sample each step consumed (tests, audits)


_SECTIONS: dict[str, type] = {
    "zero": ZeroOptions,
    "scaling": ScalingOptions,
    "fault_tolerance": FaultTolerance,
    "fault": FaultInjection,
    "data": DataOptions,
    "run": RunOptions,
}


@dataclass(frozen=True)
class JobConfig:
    stage: str
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroOptions = field(default_factory=ZeroOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    fault: FaultInjection = field(default_factory=FaultInjection)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if "seq_len" in self.model_overrides:
            raise ConfigError("model_overrides.seq_len: the model's training length is train.seq_len; set that instead")
        self.model_config()  # raises on unknown model names and keys
        if self.train.early_stopping_patience:
            raise ConfigError(
                "train.early_stopping_patience is not supported by distributed stages (every rank would have to agree "
                "to stop); set it to 0 and choose train.max_steps, or use launchers.train_local"
            )
        if self.scaling.elastic:
            for workers in range(self.scaling.min_workers, self.scaling.num_workers + 1):
                self.grad_accum_steps_for(workers)  # every admissible size must keep the global batch

    def check_runnable(self) -> JobConfig:
        """The inputs a run needs are named (kept apart from __post_init__ so overrides can fill them in)."""
        if not self.data.manifest:
            raise ConfigError("data.manifest is empty: give the manifest.json of a prepared dataset (python -m launchers.prep)")
        if self.stage.startswith("stage2-") and not self.run.init_from:
            raise ConfigError(f"{self.stage} needs run.init_from=<stage-1 export directory>")
        if self.stage == "stage3" and not (self.run.init_from_text and self.run.init_from_code):
            raise ConfigError("stage3 needs run.init_from_text and run.init_from_code (the two stage-2 exports)")
        return self

    # ---- derived values ----

    def model_config(self):
        overrides = {**self.model_overrides, "seq_len": self.train.seq_len}
        try:
            return get_config(self.model, **overrides)
        except ValueError as error:
            raise ConfigError(f"model={self.model!r} / model_overrides: {error}") from None

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, fixed by the nominal worker count so a resize keeps it."""
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.scaling.num_workers

    def grad_accum_steps_for(self, world_size: int) -> int:
        per_micro_step = self.train.micro_batch_size * world_size
        if self.global_batch_size % per_micro_step:
            raise ConfigError(
                f"global batch {self.global_batch_size} (micro_batch_size {self.train.micro_batch_size} x "
                f"grad_accum_steps {self.train.grad_accum_steps} x num_workers {self.scaling.num_workers}) is not "
                f"divisible by micro_batch_size x {world_size} workers; choose min_workers/num_workers so it is"
            )
        return self.global_batch_size // per_micro_step

    @property
    def run_name(self) -> str:
        return self.run.name or self.stage

    def init_from(self) -> str | dict[str, str] | None:
        if self.stage == "stage3":
            return {"text": self.run.init_from_text, "code": self.run.init_from_code}
        return self.run.init_from or None

    # ---- (de)serialisation ----

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(stage=self.stage, model=self.model, model_overrides=dict(self.model_overrides))
        out["train"] = self.train.to_dict()
        for name in _SECTIONS:
            values = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any], *, stage: str | None = None) -> JobConfig:
        values = dict(values)
        known = {"stage", "model", "model_overrides", "train", *_SECTIONS}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown job config key {key!r}; known: {', '.join(sorted(known))}")
        stage = stage or values.get("stage")
        if stage is None:
            raise ConfigError("no stage given: pass --stage or set stage = \"...\" in the config file")
        if stage not in STAGES:
            raise ConfigError(f"stage={stage!r}: choose one of {', '.join(STAGES)}")
        train = TrainConfig.for_stage(stage, **values.get("train", {}))
        sections = {name: _section(name, kind, values.get(name, {})) for name, kind in _SECTIONS.items()}
        model_overrides = dict(values.get("model_overrides", {}))
        return cls(stage=stage, model=values.get("model", "tiny"), model_overrides=model_overrides, train=train, **sections)

    def override(self, *assignments: str) -> JobConfig:
        """Apply "section.key=value" strings (section: train, model, zero, scaling, fault_tolerance, fault, data, run)."""
        values = self.to_dict()
        train_assignments = []
        for assignment in assignments:
            dotted, sep, text = assignment.partition("=")
            section, dot, key = dotted.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(f"override {assignment!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
            text = text.strip()
            if section == "train":
                train_assignments.append(f"{key}={text}")
            elif section == "model":
                if key == "name":
                    values["model"] = text
                else:
                    values["model_overrides"][key] = _parse_model_value(self, key, text)
            elif section in _SECTIONS:
                kind = _SECTIONS[section]
                hints = typing.get_type_hints(kind)
                if key not in hints:
                    raise ConfigError(f"unknown key {key!r} in override {assignment!r}; {section} keys: {', '.join(hints)}")
                values[section][key] = _parse(f"{section}.{key}", hints[key], text)
            else:
                raise ConfigError(
                    f"unknown section {section!r} in override {assignment!r}; sections: train, model, {', '.join(_SECTIONS)}"
                )
        if train_assignments:
            values["train"] = self.train.override(*train_assignments).to_dict()
        return JobConfig.from_dict(values)


def _section(name: str, kind: type, values: typing.Mapping[str, Any]) -> Any:
    if not isinstance(values, typing.Mapping):
        raise ConfigError(f"[{name}] must be a table of key = value, got {values!r}")
    known = {f.name for f in dataclasses.fields(kind)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in [{name}]; known keys: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(kind)
    checked = {}
    for key, value in values.items():
        if typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        elif hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif hints[key] in (int, float, bool, str) and not isinstance(value, hints[key]):
            raise ConfigError(f"{name}.{key}={value!r}: must be of type {hints[key].__name__}")
        checked[key] = value
    return kind(**checked)


def _parse(key: str, kind: Any, text: str) -> Any:
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("must be finite")
            return value
        if kind is str:
            return text
        if typing.get_origin(kind) is tuple:
            return [int(part) for part in text.strip("()[] ").split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"cannot parse {key}={text!r}: {error}") from None
    raise ConfigError(f"{key} has type {kind}, which overrides cannot parse")


def _parse_model_value(config: JobConfig, key: str, text: str) -> Any:
    current = config.model_config().to_dict()
    if key not in current:
        raise ConfigError(f"unknown model key {key!r}; model keys: {', '.join(sorted(current))}")
    kind = type(current[key])
    return _parse(f"model.{key}", kind, text)


def load_job_config(path: str | os.PathLike | None, *, stage: str | None = None, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Read a TOML job config (or start from defaults when path is None), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        if stage is not None and values.get("stage") not in (None, stage):
            raise ConfigError(f"--stage {stage} contradicts stage = {values['stage']!r} in {path}")
    if stage is None and "stage" not in values:
        raise ConfigError("no stage given: pass --stage or set stage = \"...\" in the config file")
    return JobConfig.from_dict(values, stage=stage).override(*overrides).check_runnable()
