"""What a stage builds, what it starts from and what it trains, driven by the stage table (core.stages).

    trains "base"    one expert-shaped stack (the base); optionally continues from an expert export
    trains "text"    the full model, both experts initialised from the stage-1 export; only the text
    trains "code"    expert trains (its blocks, norm and embedding, i.e. its tied head); the rest is frozen
    trains "fusion"  the full model, experts loaded from the two stage-2 exports and frozen; the fusion
                     layer trains

Frozen parts get requires_grad=False and stay in eval mode while training (StageSetup.train_mode).
The result is plain data that both engines wrap.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.config import Config, ConfigError, TrainConfig
from core.manifest import Manifest
from core.stages import Stage, get_stage
from mmrec.train.export import read_export
from mmrec.train.param_groups import build_param_groups


@dataclass
class StageSetup:
    stage: Stage
    model: nn.Module  # what the optimizer and the checkpoints cover
    # Keyword arguments that select the stage's path: logits = model(inputs, **path_kwargs)[0].
    path_kwargs: dict[str, Any]
    export_prefix: str  # the submodule the stage hands on ("" = the whole model), e.g. "experts.text"
    model_config: Any  # mmrec.ModelConfig
    reported_experts: list[nn.Module]  # whose state norms are reported, in order
    frozen_modules: list[nn.Module] = field(default_factory=list)
    flops_per_token: float = 0.0  # training FLOPs per token on the stage's path (for MFU)

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen_modules:
            module.eval()

    def param_groups(self, train_cfg: TrainConfig, lr_scale: float = 1.0) -> list[dict]:
        return build_param_groups(self.model, train_cfg, lr_scale=lr_scale)

    def state_norms(self) -> torch.Tensor:
        """[2, L * experts] per-layer (state, memory) norms of the reported experts' last forward, on device."""
        h, m = zip(*(expert.state_norms() for expert in self.reported_experts))
        return torch.stack([torch.cat([torch.as_tensor(x) for x in h]), torch.cat([torch.as_tensor(x) for x in m])])


def resolve_model_config(cfg: Config, manifest: Manifest | None) -> Any:
    """The stage's ModelConfig: the preset with the config's overrides, its vocabulary from the dataset.

    The vocabulary comes from the manifest (the tokenizer the data was cut with); a model.vocab_size
    given explicitly must agree with it, or the run is refused naming both sizes.
    """
    from mmrec import get_config

    overrides = dict(cfg.model_overrides)
    if manifest is not None:
        given = overrides.get("vocab_size")
        if given is not None and given != manifest.vocab_size:
            raise ConfigError(
                f"model.vocab_size={given} but the dataset's tokenizer has {manifest.vocab_size} pieces "
                f"({cfg.data.manifest}); drop model.vocab_size (it comes from the manifest) or prepare the data "
                f"with --vocab-size {given}"
            )
        overrides["vocab_size"] = manifest.vocab_size
    try:
        return get_config(cfg.model_name, **overrides, seq_len=cfg.train.seq_len)
    except ValueError as error:
        raise ConfigError(f"[model] {error}") from None


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def _expert_state(path: str, model_cfg: Any, stage: Stage, what: str) -> dict[str, torch.Tensor]:
    export = read_export(path)
    if export.kind != "expert":
        raise ConfigError(f"{stage.name} needs {what} to be an expert export, but {path} holds a {export.kind!r} export")
    mine, theirs = model_cfg.to_dict(), export.model_config.to_dict()
    differ = {k: (theirs.get(k), v) for k, v in mine.items() if k not in ("name", "seq_len") and theirs.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: export {a} vs this run {b}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"{stage.name}: {what}={path} was trained with another model shape ({details}); start from an export "
            "of the same model config and dataset (vocab_size comes from the manifest)"
        )
    return export.state_dict


def prepare_stage(
    stage: str | Stage,
    model_cfg: Any,  # a ModelConfig
    train_cfg: TrainConfig,
    *,
    init_from: str | Mapping[str, str] | None = None,
) -> StageSetup:
    """Build the model of `stage`, load its initial weights and select what it trains.

    init_from: stage1 -> optional expert export to continue from; stage2-* -> the stage-1 export;
               stage3 -> {"text": stage-2 text export, "code": stage-2 code export} (resolved paths).
    """
    from mmrec import build_base, build_model

    stage = get_stage(stage) if isinstance(stage, str) else stage
    torch.manual_seed(train_cfg.seed)  # parameter initialisation depends only on the seed
    frozen: list[nn.Module] = []
    if stage.init_required and not init_from:
        raise ConfigError(f"{stage.name} needs run.{' and run.'.join(stage.init_keys)} (the exports it starts from)")

    if stage.trains == "base":
        model = build_base(model_cfg)
        if init_from:
            model.load_state_dict(_expert_state(init_from, model_cfg, stage, "run.init_from"), strict=True)
        trained, prefix, reported, path = model, "", [model], {}
    elif stage.expert is not None:
        model = build_model(model_cfg)
        model.init_experts_from_base(_expert_state(init_from, model_cfg, stage, "run.init_from"))
        trained = model.experts[stage.expert]
        for name, expert in model.experts.items():
            if name != stage.expert:
                _freeze(expert)
                frozen.append(expert)
        _freeze(model.fusion)
        frozen.append(model.fusion)
        prefix, reported, path = f"experts.{stage.expert}", [trained], {"expert": stage.expert}
    else:  # the fusion over both frozen experts
        if not isinstance(init_from, Mapping) or set(init_from) != {"text", "code"}:
            raise ConfigError(f"{stage.name} needs init_from for both experts: run.init_from_text and run.init_from_code")
        model = build_model(model_cfg)
        for domain in ("text", "code"):
            model.experts[domain].load_state_dict(
                _expert_state(init_from[domain], model_cfg, stage, f"run.init_from_{domain}"), strict=True)
            _freeze(model.experts[domain])
            frozen.append(model.experts[domain])
        trained, prefix, path = None, "", {"expert": None}
        reported = [model.experts["text"], model.experts["code"]]

    if trained is not None:
        flops = trained.flops_per_token()
        trained.gradient_checkpointing = train_cfg.activation_checkpointing
        for key in ("freeze_first_n_layers", "lower_lr_first_n_layers"):
            if getattr(train_cfg, key) > len(trained.blocks):
                raise ConfigError(f"train.{key}={getattr(train_cfg, key)} exceeds the expert's {len(trained.blocks)} layers")
        for block in trained.blocks[: train_cfg.freeze_first_n_layers]:
            _freeze(block)
            frozen.append(block)
    else:
        # Frozen experts only run forward (a third of their training FLOPs); the fusion trains.
        flops = sum(e.flops_per_token() for e in model.experts.values()) / 3 + model.fusion.flops_per_token()
    setup = StageSetup(
        stage=stage, model=model, path_kwargs=path, export_prefix=prefix, model_config=model_cfg,
        reported_experts=reported, frozen_modules=frozen, flops_per_token=float(flops),
    )
    setup.train_mode()
    return setup
