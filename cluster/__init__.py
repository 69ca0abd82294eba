"""Ray: one stage as a Ray Train job of DeepSpeed workers (job.py, worker.py), the connection that
never hangs (ray_connect.py), the step watchdog, and the whole pipeline of Ray jobs (pipeline.py).

    from cluster import run_stage
    from core.config import load_config
    result = run_stage(load_config("configs/smoke.toml", stage="stage1", overrides=["engine.kind=deepspeed"]))

Nothing here does model math or training logic: the loop is mmrec.train.Trainer.
"""
from cluster.job import StageResult, run_stage

__all__ = ["StageResult", "run_stage"]
