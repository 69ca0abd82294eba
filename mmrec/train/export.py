"""Consolidated weight exports: what one stage hands to the next stage and to generate.

An export is a directory:

    model.safetensors   fp32 weights (tied tensors stored once per name)
    export.json         {"kind": "expert" | "mmrec", "model_config": {...}, "stage", "step", "metrics"}
    tokenizer.json | tokenizer.model   the tokenizer used for training, copied beside the weights

kind "expert" is one Expert's state dict (the stage-1 base or a stage-2 expert); kind "mmrec" is the
full fused model (stage 3). The directory is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmrec.train.checkpoint import publish_directory

WEIGHTS_FILE, INFO_FILE = "model.safetensors", "export.json"
KINDS = ("expert", "mmrec")


@dataclass
class Export:
    directory: Path
    kind: str
    model_config: Any  # mmrec.ModelConfig
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]


def export_weights(
    directory: str | Path,
    module: nn.Module,
    *,
    kind: str,
    model_config: Any,
    stage: str,
    step: int,
    metrics: dict[str, float] | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write `module`'s weights (as fp32) and a description of them to `directory`, atomically."""
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {KINDS}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone(): tied parameters (embedding == head) share storage, which safetensors refuses to save.
    tensors = {name: t.detach().float().cpu().contiguous().clone() for name, t in module.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"kind": kind, "stage": stage})
    info = dict(kind=kind, model_config=model_config.to_dict(), stage=stage, step=step, metrics=metrics or {})
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if tokenizer_file is not None:
        shutil.copy2(tokenizer_file, tmp / Path(tokenizer_file).name)
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    publish_directory(tmp, directory)
    return directory


def read_export(path: str | Path) -> Export:
    """Read an export directory (or the model.safetensors inside one)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    info_path, weights_path = directory / INFO_FILE, directory / WEIGHTS_FILE
    if not info_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a weights export: expected {WEIGHTS_FILE} and {INFO_FILE} in {directory} "
            "(exports are written by the trainer as <run>/best and <run>/final)"
        )
    from mmrec import ModelConfig

    info = json.loads(info_path.read_text())
    if info.get("kind") not in KINDS:
        raise ValueError(f"{info_path}: kind {info.get('kind')!r} is not one of {KINDS}")
    return Export(
        directory=directory,
        kind=info["kind"],
        model_config=ModelConfig.from_dict(info["model_config"]),
        state_dict=load_file(str(weights_path)),
        info=info,
    )


def build_from_export(export: Export) -> nn.Module:
    """The model an export describes (an Expert or a full MMRec) with its weights loaded, in eval mode."""
    from mmrec import build_base, build_model

    model = build_base(export.model_config) if export.kind == "expert" else build_model(export.model_config)
    model.load_state_dict(export.state_dict, strict=True)
    return model.eval()
