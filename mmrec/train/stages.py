"""Stage preparation: which model a stage builds, what it initialises from, what it trains.

    stage1       the base (one Expert) on mixed data; optionally continues from an expert export
    stage2-text  full model, both experts initialised from the stage-1 export; trains only the text
    stage2-code  expert (its blocks, norm and embedding, i.e. its tied head); the rest is frozen
    stage3       full model, experts loaded from the two stage-2 exports and frozen; trains the fusion
                 layer and the LM head

Frozen parts get requires_grad=False and are kept in eval mode while training (StageSetup.train_mode).
The result is plain data, so a distributed loop can use it without the Trainer class.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrec.train.config import STAGES, TrainConfig
from mmrec.train.export import read_export
from mmrec.train.loss import ForwardFn
from mmrec.train.param_groups import build_param_groups


@dataclass
class StageSetup:
    stage: str
    model: nn.Module  # what the optimizer and the checkpoints cover
    forward: ForwardFn  # inputs [B, T] -> logits [B, T, V] on the stage's path
    # Keyword arguments that select the stage's path through `model` (forward == model(x, **path_kwargs)[0]).
    # A wrapper that must be called instead of the raw module (a DeepSpeed engine) uses these.
    path_kwargs: dict[str, Any]
    param_groups: list[dict]  # for torch.optim.AdamW; frozen parameters are in none of them
    export_module: nn.Module  # what the stage hands on: the base, one expert, or the full model
    export_kind: str  # "expert" | "mmrec" (see mmrec.train.export)
    model_config: Any  # mmrec.ModelConfig
    reported_experts: list[nn.Module]  # whose state norms are reported each step, in order
    frozen_modules: list[nn.Module] = field(default_factory=list)
    flops_per_token: float | None = None  # training FLOPs per token on the stage's path (for MFU)

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen_modules:
            module.eval()

    def state_norms(self) -> tuple[list[float], list[float]]:
        """Per-layer (h, memory) norms of the reported experts' last forward, experts concatenated in order."""
        h_norms, memory_norms = [], []
        for expert in self.reported_experts:
            h, m = expert.state_norms()
            h_norms += list(h)
            memory_norms += list(m)
        return h_norms, memory_norms


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def _expert_export_state(path: str | Path, stage: str, what: str) -> dict[str, torch.Tensor]:
    export = read_export(path)
    if export.kind != "expert":
        raise ValueError(f"{stage} needs {what} as an expert export, but {path} holds kind {export.kind!r}")
    return export.state_dict


def prepare_stage(
    stage: str,
    model_cfg: Any,  # a ModelConfig or a preset name
    train_cfg: TrainConfig,
    *,
    init_from: str | Path | Mapping[str, str | Path] | None = None,
) -> StageSetup:
    """Build the model of `stage`, load its initial weights and select what it trains.

    init_from: stage1 -> optional expert export to continue from; stage2-* -> the stage-1 export;
               stage3 -> {"text": stage-2 text export, "code": stage-2 code export}.
    """
    from mmrec import build_base, build_model, get_config

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    model_cfg = get_config(model_cfg)
    torch.manual_seed(train_cfg.seed)  # parameter initialisation depends only on the seed
    frozen: list[nn.Module] = []

    if stage == "stage1":
        model = build_base(model_cfg)
        if init_from is not None:
            model.load_state_dict(_expert_export_state(init_from, stage, "init_from"), strict=True)
        trained_expert, export_module, kind = model, model, "expert"
        reported = [model]
        path_kwargs: dict[str, Any] = {}

    elif stage.startswith("stage2-"):
        if init_from is None or isinstance(init_from, Mapping):
            raise ValueError(f"{stage} needs init_from=<stage-1 export directory> (the base to specialise)")
        domain = stage.removeprefix("stage2-")
        model = build_model(model_cfg)
        model.init_experts_from_base(_expert_export_state(init_from, stage, "init_from"))
        trained_expert = model.experts[domain]
        for name, expert in model.experts.items():
            if name != domain:
                _freeze(expert)
                frozen.append(expert)
        _freeze(model.fusion)
        frozen.append(model.fusion)
        export_module, kind, reported = trained_expert, "expert", [trained_expert]
        path_kwargs = {"expert": domain}

    else:  # stage3
        if train_cfg.freeze_first_n_layers or train_cfg.lower_lr_first_n_layers:
            raise ValueError("stage3 keeps both experts frozen: freeze_first_n_layers/lower_lr_first_n_layers must be 0")
        if not isinstance(init_from, Mapping) or set(init_from) != {"text", "code"}:
            raise ValueError('stage3 needs init_from={"text": <stage-2 text export>, "code": <stage-2 code export>}')
        model = build_model(model_cfg)
        for domain in ("text", "code"):
            state = _expert_export_state(init_from[domain], stage, f"init_from[{domain!r}]")
            model.experts[domain].load_state_dict(state, strict=True)
            _freeze(model.experts[domain])
            frozen.append(model.experts[domain])
        trained_expert = None
        export_module, kind, reported = model, "mmrec", [model.experts["text"], model.experts["code"]]
        # Frozen experts only run forward (a third of their training FLOPs) and skip their own heads.
        expert_head = 3.0 * 2 * model_cfg.d_model * model_cfg.vocab_size
        flops = sum(e.flops_per_token() - expert_head for e in model.experts.values()) / 3 + model.fusion.flops_per_token()
        path_kwargs = {"expert": None}

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs, **path_kwargs)[0]

    if trained_expert is not None:
        flops = trained_expert.flops_per_token()
        trained_expert.gradient_checkpointing = train_cfg.activation_checkpointing
        for key in ("freeze_first_n_layers", "lower_lr_first_n_layers"):
            if getattr(train_cfg, key) > len(trained_expert.blocks):
                raise ValueError(f"{key}={getattr(train_cfg, key)} exceeds the expert's {len(trained_expert.blocks)} layers")
        for block in trained_expert.blocks[: train_cfg.freeze_first_n_layers]:
            _freeze(block)
            frozen.append(block)
    setup = StageSetup(
        stage=stage,
        model=model,
        forward=forward,
        path_kwargs=path_kwargs,
        param_groups=build_param_groups(model, train_cfg),
        export_module=export_module,
        export_kind=kind,
        model_config=model_cfg,
        reported_experts=reported,
        frozen_modules=frozen,
        flops_per_token=flops,
    )
    setup.train_mode()
    return setup
