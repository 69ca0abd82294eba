"""Consolidated weight exports: what one stage hands to the next stage, to generate and to eval.

An export is a directory (a run's exports/step_N/, local or on S3):

    model.safetensors   fp32 weights (tied tensors stored once per name)
    export.json         {"kind": "expert" | "mmrec", "model_config": {...}, "stage", "step", "metrics"}
    tokenizer.model     the SentencePiece model the data was cut with

kind "expert" is one Expert's state dict (the stage-1 base or a stage-2 expert); kind "mmrec" is the
full fused model (stage 3). Both engines write it from a full fp32 state dict of the stage's model
(the DeepSpeed engine gathers that from its ZeRO partitions first).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core import storage
from core.tokenizer import TOKENIZER_FILE

WEIGHTS_FILE, INFO_FILE = "model.safetensors", "export.json"
KINDS = ("expert", "mmrec")


class ExportError(ValueError):
    """A directory is not a usable export; the message names the file and the problem."""


@dataclass
class Export:
    directory: Path  # local (an S3 export is downloaded first)
    kind: str
    model_config: Any  # mmrec.ModelConfig
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]


def export_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as fp32 CPU tensors (clones: tied weights share storage, safetensors refuses that)."""
    return {name: t.detach().float().cpu().contiguous().clone() for name, t in module.state_dict().items()}


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
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"kind": kind, "stage": stage})
    info = dict(kind=kind, model_config=model_config.to_dict(), stage=stage, step=step, metrics=metrics or {})
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


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
    info_path, weights_path = directory / INFO_FILE, directory / WEIGHTS_FILE
    if not info_path.is_file() or not weights_path.is_file():
        raise ExportError(
            f"{path} is not a weights export: expected {WEIGHTS_FILE} and {INFO_FILE} in it "
            "(exports are written by training into <run>/exports/; run:<name> finds a run's best one)"
        )
    from mmrec import ModelConfig

    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{info_path} is not valid JSON ({error}); the export is damaged: re-export it") from None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise ExportError(f"{info_path}: kind {info.get('kind') if isinstance(info, dict) else info!r} is not one of {KINDS}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{weights_path} is truncated or corrupt ({error}); re-export it from its run") from None
    try:
        model_config = ModelConfig.from_dict(info["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"{info_path}: model_config is unusable ({error})") from None
    return Export(directory=directory, kind=info["kind"], model_config=model_config, state_dict=state, info=info)


def build_from_export(export: Export) -> nn.Module:
    """The model an export describes (an Expert or a full MMRec) with its weights loaded, in eval mode."""
    from mmrec import build_base, build_model

    model = build_base(export.model_config) if export.kind == "expert" else build_model(export.model_config)
    try:
        model.load_state_dict(export.state_dict, strict=True)
    except RuntimeError as error:
        raise ExportError(f"{export.directory}: the weights do not fit its model_config ({error})") from None
    return model.eval()


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
