"""Whole-model weights out of (and frozen weights back into) a DeepSpeed engine, at any ZeRO stage.

full_fp32_state gathers every parameter as fp32 from the optimizer's master copy (a collective under
ZeRO: every rank calls it, rank 0 keeps the result); export_stage turns that into the stage's export
(mmrec.train.export_weights); restore_frozen writes exact frozen weights back after a load.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmrec.train import export_weights


class _gathered:
    """deepspeed.zero.GatheredParameters under ZeRO-3 (rank 0 modifies, then broadcasts), nothing otherwise."""

    def __init__(self, params: list, zero_stage: int) -> None:
        self.context = None
        if zero_stage == 3 and params:
            import deepspeed

            self.context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def __enter__(self) -> None:
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def full_fp32_state(module: nn.Module, frozen: dict[str, torch.Tensor], *, zero_stage: int, bf16: bool, rank: int) -> dict[str, torch.Tensor]:
    """name -> fp32 CPU tensor of every parameter and buffer on rank 0 ({} elsewhere).

    Trainable parameters come from DeepSpeed's fp32 master weights (safe_get_full_fp32_param), so a bf16
    run exports its fp32 weights, not rounded ones; frozen ones from `frozen`, which holds them exactly.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        if name in frozen:
            value = frozen[name]
        else:
            value = safe_get_full_fp32_param(param) if zero_stage > 0 or bf16 else None
            if value is None:  # plain data parallel in fp32: the module's own weights are the master copy
                value = param.detach()
        if rank == 0:
            state[name] = value.detach().float().cpu().clone()
    if rank == 0:
        for name, buffer in module.named_buffers():
            state[name] = buffer.detach().float().cpu().clone()
    return state


def export_stage(directory: Path, setup, state: dict[str, torch.Tensor], **export_info) -> Path:
    """Write the stage's export (the base, one expert or the fused model) from a full fp32 state."""
    from mmrec import build_base, build_model

    fresh = build_base(setup.model_config) if setup.stage == "stage1" else build_model(setup.model_config)
    with torch.no_grad():
        for name, tensor in list(fresh.named_parameters()) + list(fresh.named_buffers()):
            tensor.copy_(state[name])
    prefix = next(name for name, module in setup.model.named_modules() if module is setup.export_module)
    return export_weights(
        directory, fresh.get_submodule(prefix) if prefix else fresh, kind=setup.export_kind,
        model_config=setup.model_config, stage=setup.stage, **export_info,
    )


def restore_frozen(module: nn.Module, saved: dict[str, torch.Tensor], *, zero_stage: int, rank: int) -> None:
    """Copy `saved` into the frozen parameters (DeepSpeed may have dropped or re-cast them on load)."""
    named = [(n, p) for n, p in module.named_parameters() if n in saved]
    with _gathered([p for _, p in named], zero_stage):
        if rank == 0 or zero_stage < 3:
            with torch.no_grad():
                for name, param in named:
                    param.data.copy_(saved[name].to(param.dtype))
