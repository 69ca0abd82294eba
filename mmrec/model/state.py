"""Recurrent states of blocks, experts and the fused model, and their atomic save/load.

A block state holds everything needed to continue a sequence exactly where it stopped: the
associative memory (one [D/H, D/H] matrix per head, fp32), the last K - 1 inputs of the short
convolution, the channel-recurrence state when that path is on, and the absolute position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_FORMAT_VERSION = 2
_TENSOR_FIELDS = ("memory", "conv", "h")


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@dataclass
class BlockState:
    memory: torch.Tensor | None  # [B, H, D/H, D/H]  delta-rule matrix state S_T per head (fp32; fp64 for a float64
    #                                                 model); None in the memory-off ablation
    conv: torch.Tensor | None  # [B, K-1, 3D]  inputs of the short convolution before the next token (None: no conv)
    h: torch.Tensor | None  # [B, D]  channel-recurrence state h_T (None: that path is off)
    position: int  # absolute position of the next token

    @property
    def batch_size(self) -> int:
        return next(t for t in (self.memory, self.h, self.conv) if t is not None).shape[0]

    def detach(self) -> "BlockState":
        return BlockState(*(_detach(getattr(self, name)) for name in _TENSOR_FIELDS), self.position)

    def to_dict(self) -> dict[str, Any]:
        return {**{name: _detach(getattr(self, name)) for name in _TENSOR_FIELDS}, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockState":
        return cls(*(d[name] for name in _TENSOR_FIELDS), int(d["position"]))


@dataclass
class ExpertState:
    layers: list[BlockState]

    @property
    def position(self) -> int:
        return self.layers[0].position

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def detach(self) -> "ExpertState":
        return ExpertState([layer.detach() for layer in self.layers])

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertState":
        return cls([BlockState.from_dict(layer) for layer in d["layers"]])


@dataclass
class MMRecState:
    """State of the fused model; an expert that has not run yet has no state (None)."""

    text: ExpertState | None = None
    code: ExpertState | None = None

    def detach(self) -> "MMRecState":
        return MMRecState(
            self.text.detach() if self.text is not None else None,
            self.code.detach() if self.code is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: (s.to_dict() if s is not None else None) for name, s in (("text", self.text), ("code", self.code))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMRecState":
        return cls(*(ExpertState.from_dict(d[k]) if d[k] is not None else None for k in ("text", "code")))


_KINDS = {"ExpertState": ExpertState, "MMRecState": MMRecState}


def save_state(state: ExpertState | MMRecState, path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically (temp file in the same folder, then os.replace)."""
    if type(state).__name__ not in _KINDS:
        raise TypeError(f"save_state takes an ExpertState or MMRecState, got {type(state).__name__}")
    path = Path(path)
    payload = {"format_version": _FORMAT_VERSION, "kind": type(state).__name__, "state": state.to_dict()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ExpertState | MMRecState:
    """Read a state written by save_state (plain tensors and ints: safe with weights_only=True)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format_version") != _FORMAT_VERSION or payload.get("kind") not in _KINDS:
        raise ValueError(
            f"{path} is not a state written by mmrec.save_state (format {_FORMAT_VERSION}); "
            f"found keys {sorted(payload) if isinstance(payload, dict) else type(payload).__name__}"
        )
    return _KINDS[payload["kind"]].from_dict(payload["state"])
