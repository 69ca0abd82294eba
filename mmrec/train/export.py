"""Consolidated weight exports: what one stage hands to the next stage, to generate and to eval.

An export is a directory (a run's exports/step_N/, local or on S3) in the interoperable layout of
mmrec.hub, so `mmrec.from_pretrained(directory)` loads it without this package:

    config.json         {"model_type": "mmrec", "kind": "expert" | "mmrec", "format_version": 1,
                         <the ModelConfig fields>, "training": {"stage", "step", "metrics"}}
    model.safetensors   fp32 weights, one tensor per state-dict name
    tokenizer.model     the SentencePiece model the data was cut with

kind "expert" is one Expert's state dict (the stage-1 base or a stage-2 expert); kind "mmrec" is the
full fused model (stage 3). Both engines write it from a full fp32 state dict of the stage's model
(the DeepSpeed engine gathers that from its ZeRO partitions first). Exports of the earlier layout
(export.json instead of config.json) still read.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import storage
from mmrec import hub
from mmrec.hub import CONFIG_FILE, KINDS, WEIGHTS_FILE, ExportError  # noqa: F401 - ExportError is this module's error

TRAINING_KEY = "training"  # config.json's key for the training metadata: stage, step, metrics
LEGACY_INFO_FILE = "export.json"  # the layout before config.json


@dataclass
class Export:
    directory: Path  # local (an S3 export is downloaded first)
    kind: str
    model_config: Any  # mmrec.ModelConfig
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]  # kind, model_config (a dict), stage, step, metrics


def export_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as fp32 CPU tensors (clones: tied weights share storage, safetensors refuses that)."""
    return hub.fp32_state(module)


def write_export(
    directory: str | Path,
    state: dict[str, torch.Tensor],  # the full model's fp32 weights
    *,
    prefix: str,  # the submodule to export ("" = everything), e.g. "experts.text"
    kind: str,
    model_config: Any,
    stage: str,
    step: int,
    metrics: dict[str, float] | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write the export into the local directory `directory` (created; replaced if present)."""
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {KINDS}")
    head = f"{prefix}." if prefix else ""
    tensors = {name[len(head):]: t.contiguous() for name, t in state.items() if name.startswith(head)}
    if not tensors:
        raise ValueError(f"no weights under {prefix!r} in the state to export")
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    training = {"stage": stage, "step": step, "metrics": metrics or {}}
    return hub.write_pretrained(directory, tensors, kind=kind, model_config=model_config,
                                tokenizer_file=tokenizer_file, extra={TRAINING_KEY: training})


def export_module(directory: str | Path, module: nn.Module, *, kind: str, model_config: Any, stage: str,
                  step: int = 0, metrics: dict[str, float] | None = None, tokenizer_file: str | Path | None = None) -> Path:
    """Export a live module as it is (tests and tools; training goes through the engines)."""
    return write_export(directory, export_state(module), prefix="", kind=kind, model_config=model_config,
                        stage=stage, step=step, metrics=metrics, tokenizer_file=tokenizer_file)


def read_export(path: str | Path, *, cache_dir: str | Path | None = None) -> Export:
    """Read an export directory (local, or s3:// downloaded into cache_dir), or the model.safetensors in one."""
    url = str(path)
    if storage.is_s3(url):
        local = storage.download_dir(url.removesuffix("/" + WEIGHTS_FILE),
                                     Path(cache_dir or tempfile.mkdtemp(prefix="mmrec-export-")) / "export")
    else:
        local = Path(storage.local_path(url))
    directory = local.parent if local.is_file() else local
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() and (directory / LEGACY_INFO_FILE).is_file():
        config_path = directory / LEGACY_INFO_FILE
    has_weights = (directory / WEIGHTS_FILE).is_file() or (directory / hub.WEIGHTS_INDEX_FILE).is_file()
    if not config_path.is_file() or not has_weights:
        raise ExportError(
            f"{path} is not a weights export: expected {WEIGHTS_FILE} and {CONFIG_FILE} in it "
            "(exports are written by training into <run>/exports/; run:<name> finds a run's best one)"
        )
    if config_path.name == LEGACY_INFO_FILE:
        try:
            legacy = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ExportError(f"{config_path} is not valid JSON ({error}); the export is damaged: re-export it") from None
        if not isinstance(legacy, dict) or not isinstance(legacy.get("model_config"), dict) or legacy.get("kind") not in KINDS:
            raise ExportError(f"{config_path}: not an export description (kind one of {KINDS} and a model_config)")
        config = {"kind": legacy["kind"], **legacy["model_config"],
                  TRAINING_KEY: {key: legacy.get(key) for key in ("stage", "step", "metrics")}}
    else:
        config = hub.read_config(directory)
    state = hub.load_weights(directory)
    model_config = hub.model_config_of(config, config_path)
    training = config.get(TRAINING_KEY) if isinstance(config.get(TRAINING_KEY), dict) else {}
    info = {"stage": None, "step": None, "metrics": {}, **training, "kind": config["kind"],
            "model_config": model_config.to_dict()}
    return Export(directory=directory, kind=config["kind"], model_config=model_config, state_dict=state, info=info)


def build_from_export(export: Export) -> nn.Module:
    """The model an export describes (an Expert or a full MMRec) with its weights loaded, in eval mode."""
    return hub.build(export.kind, export.model_config, export.state_dict, export.directory)


@dataclass
class LoadedExport:
    url: str  # where it was found (path or s3:// URL)
    export: Export
    model: nn.Module  # in eval mode, on `device`
    tokenizer: Any  # core.tokenizer.SentencePieceTokenizer shipped beside the weights
    device: str


def open_export(reference: str, *, storage_path: str, device: str = "auto") -> LoadedExport:
    """An export (a directory, an s3:// URL or run:<name>[@best|@latest] under storage_path) with its
    model built on `device` ("auto": CUDA when present) and its tokenizer, checked against each other."""
    from core.tokenizer import load_tokenizer
    from mmrec.train.checkpoint import resolve_export

    try:
        url = resolve_export(reference, storage_path)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(str(error)) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device cuda was asked for, but this machine has no CUDA device")
    export = read_export(url)
    try:
        tokenizer = load_tokenizer(export.directory)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from None
    model = build_from_export(export).to(device)
    if export.model_config.vocab_size != tokenizer.vocab_size:
        raise ExportError(f"{reference}: the model has {export.model_config.vocab_size} output tokens but its tokenizer "
                          f"{tokenizer.vocab_size} pieces; re-export it from a run of this dataset")
    return LoadedExport(url=url, export=export, model=model, tokenizer=tokenizer, device=device)
