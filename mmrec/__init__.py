"""MM-Rec: recurrent text and code experts joined by a fusion layer.

Importing `mmrec` loads only the model API (torch + kernels); training, data and metrics live in
their own subpackages and are imported explicitly.
"""
from mmrec.config import CONFIG_NAMES, ModelConfig, get_config
from mmrec.model import (
    BlockState, Expert, ExpertState, MMRec, MMRecState, build_base, build_model, count_parameters, load_state, save_state,
)

__all__ = [
    "CONFIG_NAMES", "BlockState", "Expert", "ExpertState", "MMRec", "MMRecState", "ModelConfig", "build_base",
    "build_model", "count_parameters", "get_config", "load_state", "save_state",
]
