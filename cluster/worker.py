"""What every Ray Train worker runs for one stage: the Ray glue around the one training loop.

    train_worker(cfg.to_dict())        # called by TorchTrainer in each worker process

Ray glue only: the worker's rank from the Train context, checkpoints handed to ray.train.report
(which uploads every rank's part into the run directory), the step watchdog that ends a hung
attempt so Ray Train's FailureConfig restarts it, logging that bypasses Ray Train's print patch.
Everything else (engine, data, schedule, validation, exports, NaN rollback, records) is
mmrec.train.Trainer, the same loop a single process runs.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cluster.watchdog import StepWatchdog
from core.config import Config
from mmrec.metrics.exporter import exporter_for
from mmrec.train.loop import Trainer, WorkerContext


def _log_to_stdout(rank: int) -> None:
    # A handler on sys.stdout, not print(): Ray Train patches print to tee into its logger, which
    # doubles every line in the job log. Only rank 0 speaks; the others warn.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("mmrec")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def _report(local: Path, name: str, metrics: dict[str, Any]) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)), checkpoint_dir_name=name)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (train_loop_per_worker)."""
    import ray.train

    cfg = Config.from_dict(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _log_to_stdout(rank)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    watchdog = StepWatchdog(cfg.fault_tolerance.step_timeout_s)
    exporter = exporter_for(cfg, rank=rank, world_size=world_size)
    try:
        Trainer(cfg, metrics=exporter, context=WorkerContext(
            rank=rank, world_size=world_size, local_rank=context.get_local_rank(), publish=_report, watchdog=watchdog,
        )).fit()
    finally:
        watchdog.close()
        if exporter is not None:
            time.sleep(cfg.metrics.linger_s)
            exporter.close()
