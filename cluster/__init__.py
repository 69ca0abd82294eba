"""Distributed stages: each stage is a Ray Train run whose workers train MM-Rec under DeepSpeed ZeRO.

    from cluster import load_job_config, run_stage
    result = run_stage(load_job_config("configs/smoke.toml", stage="stage1", overrides=["train.max_steps=50"]))

Modules: config (JobConfig), deepspeed_config (derived DeepSpeed JSON), worker (the per-worker loop),
job (TorchTrainer launch), checkpoints (layout, completion, fallback), watchdog, storage, pipeline
(prep + the four stages + evaluation + a sample), bench. Nothing here does model math: the model,
loss, schedule and stage setup come from mmrec.
"""
from cluster.config import ConfigError, JobConfig, load_job_config
from cluster.job import StageResult, run_stage

__all__ = ["ConfigError", "JobConfig", "StageResult", "load_job_config", "run_stage"]
