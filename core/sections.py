"""The sections of the config tree (core.config assembles them): strictly typed, frozen, range-checked.

Each dataclass is one `[section]` of a config file; core.configtree checks the types, and each
__post_init__ the ranges, raising ConfigError with the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from core.configtree import ConfigError

MIN_VOCAB_SIZE = 300


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    # optimiser and schedule
    lr: float = 3e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still reported)
    # batch geometry: one optimizer step sees grad_accum_steps * micro_batch_size * seq_len tokens per worker
    grad_accum_steps: int = 1
    micro_batch_size: int = 8
    seq_len: int = 512  # must equal the prepared dataset's seq_len
    # numerics and memory. "auto": bf16 autocast where bf16 pays (CUDA, or a CPU with bf16
    # instructions whose measured bf16 GEMM beats fp32 by 1.25x, as with AMX), fp32 elsewhere; the scan, the memory and the loss accumulate in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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
        for key in ("lr", "lower_lr_factor"):
            _require(getattr(self, key) > 0, f"train.{key}={getattr(self, key)!r}: must be > 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 f"train.betas={list(self.betas)!r}: must be two numbers in [0, 1)")
        _require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay!r}: must be >= 0")
        _require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip!r}: must be >= 0 (0 disables clipping)")
        for key in ("max_steps", "grad_accum_steps", "micro_batch_size", "seq_len", "eval_batches", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)!r}: must be an integer >= 1")
        for key in ("warmup_steps", "eval_every", "early_stopping_patience", "checkpoint_every",
                    "freeze_first_n_layers", "lower_lr_first_n_layers", "seed"):
            _require(getattr(self, key) >= 0, f"train.{key}={getattr(self, key)!r}: must be an integer >= 0")
        _require(self.warmup_steps <= self.max_steps,
                 f"train.warmup_steps={self.warmup_steps} must be <= train.max_steps ({self.max_steps})")
        _require(self.keep_checkpoints >= 2,
                 f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 2 so a broken latest can fall back")
        _require(self.early_stopping_min_delta >= 0, "train.early_stopping_min_delta: must be >= 0")
        _require(self.early_stopping_patience == 0 or self.eval_every > 0,
                 "train.early_stopping_patience needs train.eval_every > 0 (early stopping counts evaluations)")
        _require(not (self.freeze_first_n_layers and self.lower_lr_first_n_layers),
                 "train.lower_lr_first_n_layers cannot be combined with train.freeze_first_n_layers; choose one")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # manifest.json of a prepared dataset (path or s3://), from launchers.prep
    seed: int = 0  # the global sample order depends only on (seed, epoch)
    on_corrupt: Literal["raise", "skip"] = "raise"  # a corrupt shard stops the run, or is skipped and counted


@dataclass(frozen=True)
class RunConfig:
    # The run directory is storage_path/name (a local path or s3://bucket/prefix): checkpoints,
    # exports and the run's records (metrics.jsonl, loss.png) live there, for both engines.
    storage_path: str = "runs"
    name: str = ""  # default: the stage name
    # Exports a stage starts from: an export directory (path or s3://) or "run:<name>" (that run's
    # best export; "run:<name>@latest" for its newest) under the same storage_path.
    init_from: str = ""  # stage2-*: the stage-1 export; stage1: optional export to continue from
    init_from_text: str = ""  # stage3: the stage-2 text export
    init_from_code: str = ""  # stage3: the stage-2 code export
    tensorboard: bool = False  # also write TensorBoard event files beside metrics.jsonl
    plots: bool = True  # loss.png of training and validation loss, refreshed at every evaluation
    record_sample_digests: bool = False  # write a digest of every sample each step consumed (tests, audits)


@dataclass(frozen=True)
class EngineConfig:
    # "torch": one process, plain PyTorch (no Ray). "deepspeed": a Ray Train job whose workers wrap
    # the model with deepspeed.initialize (ZeRO 0-3, offload), one per scaling.num_workers.
    kind: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 0
    offload_optimizer: bool = False  # optimizer states and step on the CPU (DeepSpeedCPUAdam), ZeRO >= 1
    offload_param: bool = False  # parameters on the CPU between uses; DeepSpeed allows it with ZeRO-3 only

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"engine.zero_stage={self.zero_stage!r}: must be 0, 1, 2 or 3")
        if self.kind == "torch":
            _require(self.zero_stage == 0 and not self.offload_optimizer and not self.offload_param,
                     "engine.kind='torch' is one plain PyTorch process: ZeRO and offload need engine.kind='deepspeed'")
        _require(not self.offload_optimizer or self.zero_stage >= 1,
                 "engine.offload_optimizer=true needs engine.zero_stage >= 1 (stage 0 keeps the optimizer on each rank)")
        _require(not self.offload_param or self.zero_stage == 3,
                 f"engine.offload_param=true needs engine.zero_stage=3 (got {self.zero_stage})")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # the nominal (and maximum) number of workers; fixes the global batch
    min_workers: int = 0  # > 0 makes a deepspeed run elastic: Ray Train may run min_workers..num_workers
    cpus_per_worker: float = 1.0  # also the torch threads of each worker
    use_gpu: bool = False  # one GPU per worker (NCCL); CPU workers talk over gloo

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"scaling.num_workers={self.num_workers!r}: must be >= 1")
        _require(0 <= self.min_workers <= self.num_workers,
                 f"scaling.min_workers={self.min_workers!r}: must be 0 (fixed size) or 1..num_workers ({self.num_workers})")
        _require(self.cpus_per_worker > 0, f"scaling.cpus_per_worker={self.cpus_per_worker!r}: must be > 0")

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers


@dataclass(frozen=True)
class FaultToleranceConfig:
    max_failures: int = 2  # worker/node failures Ray Train restarts from the last checkpoint (-1: unlimited)
    step_timeout_s: float = 600.0  # a training step slower than this fails the attempt (hang watchdog)
    nan_max_rollbacks: int = 3  # NaN/Inf loss or gradient rollbacks to the last checkpoint before the run fails
    nan_lr_factor: float = 0.5  # the lr is multiplied by this on every rollback

    def __post_init__(self) -> None:
        _require(self.max_failures >= -1, f"fault_tolerance.max_failures={self.max_failures}: must be >= 0 (-1: unlimited)")
        _require(self.step_timeout_s > 0, f"fault_tolerance.step_timeout_s={self.step_timeout_s}: must be > 0 seconds")
        _require(self.nan_max_rollbacks >= 0, f"fault_tolerance.nan_max_rollbacks={self.nan_max_rollbacks}: must be >= 0")
        _require(0 < self.nan_lr_factor < 1, f"fault_tolerance.nan_lr_factor={self.nan_lr_factor}: must be in (0, 1)")


@dataclass(frozen=True)
class FaultInjection:
    """Faults a real component cannot produce on demand, injected at an optimizer step.

    The one sanctioned stand-in of the project: tests and drills use it to prove the recovery paths.
    Step faults fire on the first attempt only (a marker in the run directory records that they
    fired), so the restarted run can pass the same step.
    """

    fail_at_step: int = 0  # a worker raises during this step
    kill_at_step: int = 0  # a worker process kills itself (SIGKILL) during this step
    hang_at_step: int = 0  # a worker sleeps forever in this step (the watchdog must end the attempt)
    fault_rank: int = -1  # which rank misbehaves; -1: the last rank
    nan_at_steps: tuple[int, ...] = ()  # the loss of these steps becomes NaN ...
    nan_times: int = 1  # ... this many times per listed step (more than nan_max_rollbacks: the run must fail)

    def __post_init__(self) -> None:
        for key in ("fail_at_step", "kill_at_step", "hang_at_step", "nan_times"):
            _require(getattr(self, key) >= 0, f"fault.{key}={getattr(self, key)!r}: must be an integer >= 0 (0: off)")
        _require(all(s >= 1 for s in self.nan_at_steps), f"fault.nan_at_steps={list(self.nan_at_steps)}: steps are >= 1")

    @property
    def any_step_fault(self) -> bool:
        return bool(self.fail_at_step or self.kill_at_step or self.hang_at_step)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False  # serve Prometheus metrics from every worker
    port: int = 9400  # first port tried (the exporter searches upwards); 0: any free port
    # Peak FLOP/s of one worker's device for MFU; 0: measured once on CPUs (a short GEMM in the dtype
    # in use, cached) or read from the device table on GPUs.
    peak_flops: float = 0.0
    # Keep serving this long after training ends, so a scrape sees the final values of a short run.
    linger_s: float = 0.0

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"metrics.port={self.port}: must be in 0..65535")
        _require(self.linger_s >= 0, f"metrics.linger_s={self.linger_s}: must be >= 0")
        _require(self.peak_flops >= 0, f"metrics.peak_flops={self.peak_flops}: must be >= 0 (0: measure)")


@dataclass(frozen=True)
class RayConfig:
    # The cluster: this address, else RAY_ADDRESS, else (inside `ray job submit`) the job's own
    # cluster, else a fresh local instance. Never a stale session file of an earlier cluster.
    address: str = ""
    connect_timeout_s: float = 60.0  # give up connecting after this long, with a message naming the address
    schedule_timeout_s: float = 600.0  # a job or task group that cannot be scheduled this long is stopped

    def __post_init__(self) -> None:
        _require(self.connect_timeout_s > 0, "ray.connect_timeout_s: must be > 0")
        _require(self.schedule_timeout_s > 0, "ray.schedule_timeout_s: must be > 0")


@dataclass(frozen=True)
class PrepConfig:
    out: str = ""  # output directory: a path, file:// or s3://
    sources: tuple[str, ...] = ("demo",)  # see datasets_prep.sources for the source syntax
    vocab_size: int = 32000
    tokenizer: str = ""  # bring your own SentencePiece model (path or s3://) instead of training one
    seq_len: int = 2048
    val_fraction: float = 0.01
    shard_mb: float = 64.0
    partition_mb: float = 16.0
    tokenizer_sample_mb: float = 16.0
    progress: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.sources), "prep.sources: give at least one source, e.g. 'demo' or 'dir:/data?domain=text'")
        _require(self.vocab_size >= MIN_VOCAB_SIZE,
                 f"prep.vocab_size={self.vocab_size} is too small: byte fallback alone needs 260 pieces; "
                 f"use at least {MIN_VOCAB_SIZE}")
        _require(self.seq_len >= 1, f"prep.seq_len={self.seq_len}: must be >= 1")
        _require(0.0 <= self.val_fraction < 1.0, f"prep.val_fraction={self.val_fraction}: must be in [0, 1)")
        for key in ("shard_mb", "partition_mb", "tokenizer_sample_mb"):
            _require(getattr(self, key) > 0, f"prep.{key}={getattr(self, key)}: must be > 0")


@dataclass(frozen=True)
class PipelineConfig:
    out: str = "runs/smoke"  # data, stage runs, logs and the report go under here (path or s3://)
    address: str = ""  # the dashboard of an existing Ray cluster (http://host:8265); empty: a local head
    num_cpus: int = 2  # CPUs of the local Ray head the pipeline starts when address is empty
    eval_batches: int = 8  # validation batches per domain in the final evaluation table
    # The fused model must be no worse than each expert on its own domain (within this many nats)
    # and no worse than the experts routed by an oracle on mixed data (within it again).
    fusion_slack: float = 0.02
    enforce_checks: bool = True  # false: report failed checks without failing the run (quick experiments)
    prompt: str = "def "
    sample_tokens: int = 60

    def __post_init__(self) -> None:
        _require(self.num_cpus >= 1, f"pipeline.num_cpus={self.num_cpus}: must be >= 1 (the stages need CPUs to run)")
        _require(self.eval_batches >= 1, "pipeline.eval_batches: must be >= 1")
        _require(self.fusion_slack >= 0, "pipeline.fusion_slack: must be >= 0")
        _require(self.sample_tokens >= 1, "pipeline.sample_tokens: must be >= 1")


@dataclass(frozen=True)
class GenerateConfig:
    export: str = ""  # an export directory (path or s3://), or run:<name>[@best|@latest] under run.storage_path
    prompt: str = ""
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus sampling; 1: off
    num_samples: int = 1
    seed: int = -1  # -1: a fresh seed every run
    stop_at_eos: bool = True
    path: Literal["auto", "fused", "text", "code"] = "auto"  # which path of a fused export; auto: fused
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, f"generate.max_new_tokens={self.max_new_tokens}: must be >= 1")
        _require(self.temperature >= 0, f"generate.temperature={self.temperature}: must be >= 0 (0: greedy)")
        _require(self.top_k >= 0, f"generate.top_k={self.top_k}: must be >= 1, or 0 for off")
        _require(0 < self.top_p <= 1, f"generate.top_p={self.top_p}: must be in (0, 1]")
        _require(self.num_samples >= 1, f"generate.num_samples={self.num_samples}: must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    export: str = ""  # an export directory, or run:<name>[@best|@latest]
    data: str = ""  # a manifest.json, a JSONL file (text field per line) or a directory of text files
    split: Literal["val", "train"] = "val"  # the manifest split to score
    max_tokens: int = 0  # stop after this many scored tokens per domain; 0: all
    batch_size: int = 8
    path: Literal["auto", "fused", "text", "code", "all"] = "all"  # fused exports: which paths to score
    json: str = ""  # also write the table as JSON here
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _require(self.max_tokens >= 0, "eval.max_tokens: must be >= 0 (0: all)")
        _require(self.batch_size >= 1, "eval.batch_size: must be >= 1")
