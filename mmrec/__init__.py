"""MM-Rec: recurrent text and code experts joined by a fusion layer.

Importing `mmrec` loads only the model API (torch + kernels) and from_pretrained/save_pretrained
(mmrec.hub: config.json + model.safetensors folders, no training code); training, data and metrics live in
their own subpackages and are imported explicitly.
"""
from mmrec.config import CONFIG_NAMES, ModelConfig, get_config
from mmrec.hub import ExportError, from_pretrained, save_pretrained
from mmrec.model import (
    BlockState, Expert, ExpertState, MMRec, MMRecState, build_base, build_model, count_parameters, load_state, save_state,
)

__all__ = [
    "CONFIG_NAMES", "BlockState", "Expert", "ExpertState", "ExportError", "MMRec", "MMRecState", "ModelConfig",
    "build_base", "build_model", "count_parameters", "from_pretrained", "get_config", "load_state", "save_pretrained",
    "save_state",
]
