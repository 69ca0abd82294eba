"""The engine interface the training loop runs on, and the plain PyTorch engine (one process).

An engine owns the model's parameters and optimizer and knows how to run one micro-batch, one
optimizer step, save and load its state, and hand out the full fp32 weights. The loop (loop.py)
does everything else, identically for every engine. The DeepSpeed engine (deepspeed_engine.py)
implements the same interface under ZeRO 0-3 for Ray Train workers.

Nothing here reads a tensor's value on the host: the loop does one host sync per optimizer step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import TrainConfig
from mmrec.train.checkpoint import ENGINE_DIR, ResumePoint
from mmrec.train.loss import lm_loss
from mmrec.train.stage_setup import StageSetup

STATE_FILE = "state.pt"


class Engine:
    """What the loop needs; see TorchEngine for the plain implementation."""

    kind = "abstract"
    rank: int = 0
    world_size: int = 1

    def __init__(self, setup: StageSetup, train_cfg: TrainConfig, *, grad_accum: int, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.setup, self.cfg, self.grad_accum = setup, train_cfg, grad_accum
        self.device, self.autocast_dtype = device, autocast_dtype

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _loss(self, call, ids: torch.Tensor, poison: bool) -> torch.Tensor:
        """Mean next-token loss of ids [B, T+1] through `call` (inputs [B, T] -> logits [B, T, V])."""
        with self._autocast():
            logits = call(ids[:, :-1])
        loss, _ = lm_loss(logits, ids)
        if poison:  # the config-driven fault hook: a NaN that flows into the gradients like a real one
            loss = loss * float("nan")
        return loss

    # ---- the interface ----

    def forward_backward(self, ids: torch.Tensor, *, poison: bool = False) -> torch.Tensor:
        """One micro-batch ids [B, T+1]: forward, backward (scaled for accumulation); the detached loss."""
        raise NotImplementedError

    def optimizer_step(self, lr_multiplier: float) -> torch.Tensor:
        """Set every group's lr to peak x multiplier, clip, step, zero the grads; the pre-clip grad norm."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, T] -> logits [B, T, V] on the stage's path (evaluation; every rank calls it)."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this rank's engine state into the local `directory` (checkpoint/engine)."""
        raise NotImplementedError

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Every weight of the model as fp32 on the CPU on rank 0, None on other ranks (a collective)."""
        raise NotImplementedError

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        pass


class TorchEngine(Engine):
    """One process, plain PyTorch: AdamW over the stage's parameter groups, clip_grad_norm_, autocast."""

    kind = "torch"

    def __init__(self, setup: StageSetup, train_cfg: TrainConfig, *, grad_accum: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, lr_scale: float = 1.0, resume: ResumePoint | None = None) -> None:
        super().__init__(setup, train_cfg, grad_accum=grad_accum, device=device, autocast_dtype=autocast_dtype)
        self.model = setup.model.to(device)
        groups = setup.param_groups(train_cfg, lr_scale)
        self.parameters = [p for group in groups for p in group["params"]]
        self.peak_lr = max(group["peak_lr"] for group in groups)
        self.optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr * lr_scale, betas=tuple(train_cfg.betas),
                                           weight_decay=train_cfg.weight_decay)
        if resume is not None:
            self._load(resume.directory / ENGINE_DIR)

    def _load(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        # The saved groups carry the hyper-parameters of the run that wrote them; this run's config wins
        # (a changed lr, betas or weight decay is applied, never silently kept from the checkpoint).
        wanted = [{k: g[k] for k in ("peak_lr", "lr", "betas", "weight_decay")} for g in self.optimizer.param_groups]
        saved_groups = state["optimizer"]["param_groups"]
        if len(saved_groups) != len(wanted):
            raise ValueError(
                f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run {len(wanted)}: "
                "train.freeze_first_n_layers / lower_lr_first_n_layers changed; resume with the old values or "
                "start a new run (run.name)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, wanted):
            group.update(values)

    def forward_backward(self, ids: torch.Tensor, *, poison: bool = False) -> torch.Tensor:
        loss = self._loss(lambda x: self.model(x, **self.setup.path_kwargs)[0], ids, poison)
        # Every micro-batch holds the same number of tokens, so the mean of the means is the batch mean.
        (loss / self.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self, lr_multiplier: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_multiplier
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)  # a tensor: no host sync
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(inputs.to(self.device), **self.setup.path_kwargs)[0]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / STATE_FILE)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().cpu().clone() for name, t in self.model.state_dict().items()}

    def describe(self) -> str:
        return f"one process ({self.device.type})"
