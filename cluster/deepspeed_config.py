"""The DeepSpeed config of a job, derived from JobConfig so the two can never disagree.

Batch geometry, gradient accumulation, clipping, precision and ZeRO come from our config; nothing
in here is a free-standing DeepSpeed knob. The optimizer and LR schedule are built by us (the
same param groups and WarmupCosine as the single-process Trainer) and handed to
deepspeed.initialize, so the JSON carries no "optimizer"/"scheduler" sections.
"""
from __future__ import annotations

from typing import Any

from cluster.config import JobConfig


def build_deepspeed_config(job: JobConfig, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    train = job.train
    grad_accum = job.grad_accum_steps_for(world_size)
    zero: dict[str, Any] = {"stage": job.zero.stage}
    if job.zero.stage >= 1:
        # Overlapping the gradient reduction with backward needs CUDA streams; on CPU it only adds copies.
        zero.update(contiguous_gradients=True, overlap_comm=job.scaling.use_gpu, reduce_bucket_size=50_000_000)
    if job.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": job.scaling.use_gpu}
    if job.zero.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": job.scaling.use_gpu}
    if job.zero.stage == 3:
        # Our export is fp32, assembled from the optimizer's master weights (cluster.worker); a 16-bit
        # consolidated copy in every checkpoint would only cost an extra gather.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_batch_size": job.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # 0 in our config means "no clipping"; DeepSpeed's 0.0 means the same.
        "gradient_clipping": float(train.grad_clip),
        "bf16": {"enabled": bool(train.bf16)},
        "fp16": {"enabled": False},  # fp16 needs loss scaling and is refused on CPU: bf16 or fp32 only
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW with named param groups
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if job.zero.offload_optimizer:
        # DeepSpeed's CPU Adam is what runs the offloaded step; it is what we construct in the worker.
        config["zero_force_ds_cpu_optimizer"] = True
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config
