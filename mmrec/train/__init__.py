"""Training: the one loop (loop.py) over two engines (engine.py: plain PyTorch, one process;
deepspeed_engine.py: DeepSpeed ZeRO, Ray Train workers), the stage setup, the checkpoint layout,
weight exports, the run's records and streaming generation.

    from core.config import load_config
    from mmrec.train import Trainer
    result = Trainer(load_config("configs/smoke.toml", stage="stage1")).fit()
"""
from mmrec.train.checkpoint import CheckpointIncomplete, find_resume_point, resolve_export
from mmrec.train.export import Export, ExportError, build_from_export, export_module, read_export, write_export
from mmrec.train.generate import generate, step_fn_for
from mmrec.train.loop import NonFiniteLossError, Trainer, TrainResult, WorkerContext
from mmrec.train.loss import EvalResult, evaluate, lm_loss
from mmrec.train.param_groups import build_param_groups
from mmrec.train.schedule import lr_multiplier
from mmrec.train.stage_setup import StageSetup, prepare_stage, resolve_model_config

__all__ = [
    "CheckpointIncomplete", "EvalResult", "Export", "ExportError", "NonFiniteLossError", "StageSetup", "TrainResult",
    "Trainer", "WorkerContext", "build_from_export", "build_param_groups", "evaluate", "export_module",
    "find_resume_point", "generate", "lm_loss", "lr_multiplier", "prepare_stage", "read_export",
    "resolve_export", "resolve_model_config", "step_fn_for", "write_export",
]
