"""Run one stage as a Ray Train job: TorchTrainer + FailureConfig + (elastic) ScalingConfig.

    result = run_stage(load_job_config("configs/smoke.toml", stage="stage1"))
    result.export        # the consolidated fp32 export of the last checkpoint (next stage's init_from)

Connects to the cluster in RAY_ADDRESS (set inside `ray job submit` jobs) or starts a local one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import checkpoints, storage
from cluster.config import JobConfig
from cluster.worker import train_worker


@dataclass
class StageResult:
    stage: str
    checkpoint: str  # the last checkpoint in the run storage (local path or s3:// URL)
    export: str  # its consolidated fp32 export
    metrics: dict[str, Any]  # the last metrics reported (step, loss, val_loss, val_perplexity, ...)
    seconds: float

    def history(self) -> list[dict[str, Any]]:
        """Per-step loss/lr/grad_norm of the whole run (restarts included), read from the last checkpoint."""
        local = storage.localize(self.checkpoint)
        return json.loads((Path(local) / checkpoints.HISTORY_FILE).read_text())


def _connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        # No runtime_env here: inside a submitted job the job's own runtime env applies.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def run_stage(job: JobConfig) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job.check_runnable()
    storage_path = storage.absolute_storage_path(job.run.storage_path)
    # Resolved once here, so every worker (and every restart) starts from the same export.
    inits = {key: checkpoints.resolve_run_reference(getattr(job.run, key), storage_path)
             for key in ("init_from", "init_from_text", "init_from_code")}
    job = dataclasses.replace(job, run=dataclasses.replace(job.run, storage_path=storage_path, **inits))
    _connect_ray()
    scaling = job.scaling
    workers = (scaling.min_workers, scaling.num_workers) if scaling.elastic else scaling.num_workers
    env = {"OMP_NUM_THREADS": str(max(1, int(scaling.cpus_per_worker)))}
    for name in ("TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    fs, root = storage.filesystem_for(job.run.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.fault_tolerance.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.stage} finished without a checkpoint; see the worker logs above")
    prefix = "s3://" if storage.is_s3(job.run.storage_path) else ""
    checkpoint = prefix + result.checkpoint.path
    return StageResult(
        stage=job.stage, checkpoint=checkpoint, export=storage.join(checkpoint, checkpoints.EXPORT_DIR),
        metrics=dict(result.metrics or {}), seconds=time.perf_counter() - started,
    )
