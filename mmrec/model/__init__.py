"""The MM-Rec model: blocks (gated delta-rule memory), experts, fusion, recurrent states."""
from mmrec.model.block import MMRecBlock
from mmrec.model.build import build_base, build_model, count_parameters
from mmrec.model.expert import Expert
from mmrec.model.fused import EXPERT_NAMES, Fusion, MMRec
from mmrec.model.layers import RMSNorm, SwiGLU
from mmrec.model.state import BlockState, ExpertState, MMRecState, load_state, save_state

__all__ = [
    "BlockState", "EXPERT_NAMES", "Expert", "ExpertState", "Fusion", "MMRec", "MMRecBlock", "MMRecState",
    "RMSNorm", "SwiGLU", "build_base", "build_model", "count_parameters", "load_state", "save_state",
]
