"""Run one stage as a Ray Train job: TorchTrainer + FailureConfig + (elastic) ScalingConfig.

    result = run_stage(load_config("configs/smoke.toml", stage="stage1"))
    result.best_export        # what the next stage starts from (also reachable as run:<name>)

The config is checked (mmrec.train.preflight) before Ray is touched; the cluster is the one
cluster.ray_connect picks, never a stale session. The AWS variables of this process travel to every
worker, and Ray Train uploads checkpoints through a pyarrow filesystem built from the same settings
as core.storage, so prep, training and exports all see one storage.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from cluster.ray_connect import connect
from cluster.worker import train_worker
from core import storage
from core.config import Config, ConfigError
from mmrec.train.checkpoint import resolve_export
from mmrec.train.hardware import allocator_env
from mmrec.train.preflight import preflight

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    run_url: str  # storage_path/name: checkpoints, exports, metrics.jsonl
    latest_export: str
    best_export: str  # the best validated export (the latest when the stage never validated)
    metrics: dict[str, Any]  # the last metrics reported (step, loss, val_loss, val_perplexity, ...)
    seconds: float


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment of every worker: thread counts, the storage credentials, the compiled-op cache, and
    glibc's allocator set up to reuse large blocks (mmrec.train.hardware.keep_freed_memory)."""
    env = {"OMP_NUM_THREADS": str(max(1, int(cfg.scaling.cpus_per_worker))), **storage.forwarded_env(),
           **allocator_env()}
    for name in ("TORCH_EXTENSIONS_DIR", "MMREC_CACHE_DIR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _wait_for_resources(cfg: Config) -> None:
    """Give up with a message when the cluster cannot fit even the smallest admissible worker group."""
    import ray

    need_workers = cfg.scaling.min_workers if cfg.scaling.elastic else cfg.scaling.num_workers
    need = {"CPU": need_workers * cfg.scaling.cpus_per_worker, "GPU": need_workers if cfg.scaling.use_gpu else 0}
    deadline = time.monotonic() + cfg.ray.schedule_timeout_s
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if v and have.get(k, 0) < v}
        if not short:
            return
        what = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{cfg.stage} needs {what} for {need_workers} workers and the cluster did not grow to that within "
                f"ray.schedule_timeout_s={cfg.ray.schedule_timeout_s:g}s: lower scaling.num_workers / "
                "scaling.cpus_per_worker, or add nodes")
        log.warning("[%s] waiting for %s ...", cfg.stage, what)
        time.sleep(min(10.0, max(1.0, deadline - time.monotonic())))


def run_stage(cfg: Config) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.engine.kind != "deepspeed":
        raise ConfigError("run_stage runs Ray Train workers: set engine.kind='deepspeed' (engine.kind='torch' "
                          "trains in this process: mmrec.train.Trainer)")
    # Local paths become absolute here: the workers run in other directories (and on other nodes).
    cfg = cfg.replace(run={"storage_path": storage.absolute(cfg.run.storage_path)},
                      data={"manifest": storage.absolute(cfg.data.manifest)})
    cfg = cfg.replace(run={key: storage.absolute(getattr(cfg.run, key)) for key in ("init_from", "init_from_text",
                                                                                   "init_from_code")
                           if getattr(cfg.run, key) and not getattr(cfg.run, key).startswith("run:")})
    log.info("[%s] %s", cfg.stage, preflight(cfg))
    connect(cfg.ray)
    _wait_for_resources(cfg)
    scaling = cfg.scaling
    fs, root = storage.pyarrow_filesystem(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.elastic else scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=root, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.fault_tolerance.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    run_url = storage.join(cfg.run.storage_path, cfg.run_name)
    return StageResult(
        stage=cfg.stage, run_url=run_url,
        latest_export=resolve_export(f"run:{cfg.run_name}@latest", cfg.run.storage_path),
        best_export=resolve_export(f"run:{cfg.run_name}", cfg.run.storage_path),
        metrics=dict(result.metrics or {}), seconds=time.perf_counter() - started,
    )

