"""Single-process training: configs, loss, schedule, parameter groups, stages, the Trainer loop,
checkpoints, weight exports, streaming generation and an in-memory token loader."""
from mmrec.train.byte_tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from mmrec.train.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from mmrec.train.config import STAGE_PRESETS, STAGES, ConfigError, TrainConfig
from mmrec.train.export import Export, build_from_export, export_weights, read_export
from mmrec.train.generate import generate, step_fn_for
from mmrec.train.loss import EvalResult, evaluate, lm_loss
from mmrec.train.param_groups import build_param_groups
from mmrec.train.schedule import WarmupCosine, build_scheduler, lr_multiplier
from mmrec.train.stages import StageSetup, prepare_stage
from mmrec.train.token_stream import TokenStream
from mmrec.train.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = [
    "ByteTokenizer", "CheckpointError", "ConfigError", "EvalResult", "Export", "NonFiniteLossError",
    "STAGES", "STAGE_PRESETS", "StageSetup", "TokenStream", "Tokenizer", "TrainConfig", "TrainResult",
    "Trainer", "WarmupCosine", "build_from_export", "build_param_groups", "build_scheduler", "evaluate",
    "export_weights", "generate", "lm_loss", "load_checkpoint", "load_latest", "load_tokenizer",
    "lr_multiplier", "prepare_stage", "read_export", "save_checkpoint", "step_fn_for",
]
