"""Interoperable weights: one folder that loads with the model package alone, no training code.

    model = mmrec.from_pretrained("runs/smoke/stages/stage3/exports/step_00000060")   # Expert or MMRec, eval mode
    mmrec.save_pretrained(model, "my-model", tokenizer_file="runs/smoke/data/tokenizer.model")
    model = mmrec.from_pretrained("user/mmrec-tiny")   # a Hugging Face Hub repo id, when the network allows

The folder (what training exports write too, mmrec.train.export):

    config.json         {"model_type": "mmrec", "kind": "expert" | "mmrec", "format_version": 1,
                         <every ModelConfig field: vocab_size, d_model, n_layers, ...>,
                         <extra keys, e.g. "training": {"stage", "step", "metrics"} from training>}
    model.safetensors   the fp32 weights, one tensor per state-dict name (huggingface_hub's
                        save_torch_state_dict: beyond 5 GB, model-0000k-of-0000n.safetensors shards
                        and model.safetensors.index.json)
    tokenizer.model     the SentencePiece model of the data (core.tokenizer.load_tokenizer reads it)

kind "expert" is one Expert (the stage-1 base or a stage-2 expert), kind "mmrec" the fused model.
The files are plain safetensors and JSON, so the folder also uploads as it is (huggingface_hub's
upload_folder) and a repo id loads through snapshot_download. Problems with a folder raise
ExportError naming the file and what is wrong with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrec.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"  # the name core.tokenizer.load_tokenizer looks for
MODEL_TYPE, FORMAT_VERSION = "mmrec", 1
KINDS = ("expert", "mmrec")
_RESERVED = ("model_type", "kind", "format_version")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ExportError(ValueError):
    """A folder or repo is not a usable export; the message names the file and the problem."""


def kind_of(model: nn.Module) -> str:
    from mmrec.model import Expert, MMRec

    if isinstance(model, MMRec):
        return "mmrec"
    if isinstance(model, Expert):
        return "expert"
    raise TypeError(f"save_pretrained takes an mmrec Expert or MMRec, got {type(model).__name__}")


def fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as fp32 CPU tensors (clones: no storage shared between names)."""
    return {name: t.detach().float().cpu().contiguous().clone() for name, t in module.state_dict().items()}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (an Expert or an MMRec) as config.json + model.safetensors (fp32) into `directory`,
    with the tokenizer file copied beside them when given; `extra` adds JSON keys to config.json."""
    return write_pretrained(directory, fp32_state(model), kind=kind_of(model), model_config=model.config,
                            tokenizer_file=tokenizer_file, extra=extra)


def write_pretrained(directory: str | os.PathLike, state: dict[str, torch.Tensor], *, kind: str,
                     model_config: ModelConfig, tokenizer_file: str | os.PathLike | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """The folder of save_pretrained from a state dict (training hands its consolidated fp32 weights).
    config.json is written last, so a folder with a config.json has its weights."""
    from huggingface_hub import save_torch_state_dict

    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {KINDS}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & (set(_RESERVED) | {f.name for f in dataclasses.fields(ModelConfig)}))
    if clash:
        raise ValueError(f"extra config.json keys {clash} would overwrite the model's own keys")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    save_torch_state_dict({name: t.contiguous() for name, t in state.items()}, directory, metadata={"kind": kind})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    config = {"model_type": MODEL_TYPE, "kind": kind, "format_version": FORMAT_VERSION, **model_config.to_dict(), **extra}
    staged = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    staged.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(staged, directory / CONFIG_FILE)
    return directory


def locate(reference: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
           token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """A local export folder (or a file in one), else a Hub repo id downloaded (or found in the cache)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    text = str(reference)
    if path.is_absolute() or text.startswith((".", "~")) or not _REPO_ID.match(text):
        raise ExportError(f"{text} is not a weights export: no such folder (expected {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE} in it, or a Hugging Face Hub repo id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            text, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            allow_patterns=[CONFIG_FILE, "model*.safetensors", WEIGHTS_INDEX_FILE, TOKENIZER_FILE],
            library_name="mmrec"))
    except (OSError, ValueError) as error:  # offline, no such repo, no access: huggingface_hub's errors
        raise ExportError(f"{text} is no local folder, and the Hugging Face Hub could not provide it: "
                          f"{type(error).__name__}: {error}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of an export folder, checked: valid JSON, an mmrec kind."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{directory} is not a weights export: expected {WEIGHTS_FILE} and {CONFIG_FILE} in it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}); the export is damaged: re-export it") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds a JSON {type(config).__name__}, not the object of an mmrec config")
    if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ExportError(f"{path}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}; "
                          "this folder holds another library's model")
    if config.get("kind") not in KINDS:
        raise ExportError(f"{path}: kind {config.get('kind')!r} is not one of {KINDS}")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {version!r} is not one this code reads (<= {FORMAT_VERSION}); "
                          "update mmrec")
    return config


def model_config_of(config: dict[str, Any], where: str | os.PathLike = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig held by a config.json (its ModelConfig keys; the others are metadata)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig.from_dict({key: value for key, value in config.items() if key in names})
    except (TypeError, ValueError) as error:
        raise ExportError(f"{where}: the model config is unusable ({error})") from None


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an export folder: model.safetensors, or the shards its index names."""
    from huggingface_hub import load_state_dict_from_file
    from safetensors import SafetensorError

    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    elif index.is_file():
        try:
            files = [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ExportError(f"{index} is damaged ({type(error).__name__}: {error}); re-export it") from None
    else:
        raise ExportError(f"{directory} is not a weights export: expected {WEIGHTS_FILE} and {CONFIG_FILE} in it")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_state_dict_from_file(file, map_location="cpu"))
        except (SafetensorError, OSError, ValueError) as error:
            raise ExportError(f"{file} is truncated or corrupt ({error}); re-export it from its run") from None
    return state


def build(kind: str, model_config: ModelConfig, state: dict[str, torch.Tensor], where: str | os.PathLike = "") -> nn.Module:
    """The model of `kind` with `state` loaded (strict), in eval mode."""
    from mmrec.model import Expert, MMRec

    model = Expert(model_config) if kind == "expert" else MMRec(model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"{where}: the weights do not fit its config ({error})") from None
    return model.eval()


def from_pretrained(reference: str | os.PathLike, *, device: str | torch.device | None = None,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    token: str | bool | None = None, local_files_only: bool = False) -> nn.Module:
    """The Expert or MMRec of an export folder (or Hub repo id), weights loaded, in eval mode."""
    directory = locate(reference, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    config = read_config(directory)
    model = build(config["kind"], model_config_of(config, directory / CONFIG_FILE), load_weights(directory), directory)
    return model.to(device) if device is not None else model
