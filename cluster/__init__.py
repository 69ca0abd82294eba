"""Ray: one stage as a Ray Train run of DeepSpeed workers (launch.py, worker.py), the connection that
never hangs (ray_connect.py), a local head (ray_head.py), the step watchdog, and the whole pipeline
as Ray jobs (job_runner.py, pipeline.py).

    from cluster import run_stage
    from core.config import load_config
    result = run_stage(load_config("configs/smoke.toml", stage="stage1", overrides=["engine.kind=deepspeed"]))

Nothing here does model math or training logic: the loop is mmrec.train.Trainer.
"""
from cluster.launch import StageResult, run_stage

__all__ = ["StageResult", "run_stage"]
