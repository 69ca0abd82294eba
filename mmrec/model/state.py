"""Recurrent states of blocks, experts and the fused model, and their atomic save/load.

A state holds everything needed to continue a sequence exactly where it stopped: the scan state, the
memory, the online-softmax accumulators of the memory write of the unfinished segment, and the
absolute position (which fixes where the next segment border falls).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_FORMAT_VERSION = 1


@dataclass
class BlockState:
    h: torch.Tensor  # [B, D]        scan state h_T (fp32, or fp64 for a float64 model)
    memory: torch.Tensor  # [B, S, D]   memory after the last finished segment
    write_max: torch.Tensor  # [B, H, S]   running max of the write scores of the unfinished segment
    write_norm: torch.Tensor  # [B, H, S]   running softmax normaliser (scaled to write_max)
    write_sum: torch.Tensor  # [B, H, S, D/H]  running softmax-weighted sum of write values
    position: int  # absolute position of the next token

    def detach(self) -> "BlockState":
        return BlockState(
            self.h.detach(), self.memory.detach(), self.write_max.detach(), self.write_norm.detach(),
            self.write_sum.detach(), self.position,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "h": self.h.detach(), "memory": self.memory.detach(), "write_max": self.write_max.detach(),
            "write_norm": self.write_norm.detach(), "write_sum": self.write_sum.detach(), "position": self.position,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockState":
        return cls(d["h"], d["memory"], d["write_max"], d["write_norm"], d["write_sum"], int(d["position"]))


@dataclass
class ExpertState:
    layers: list[BlockState]

    @property
    def position(self) -> int:
        return self.layers[0].position

    @property
    def batch_size(self) -> int:
        return self.layers[0].h.shape[0]

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
