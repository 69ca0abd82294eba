"""The one training loop of the quality benchmarks (benchmarks.mqar, benchmarks.lm_quality).

Every model of a comparison goes through `train` with the same batches, steps, AdamW settings and
schedule (linear warm-up, then cosine to zero), so only the model differs. Models expose
`features(ids) -> (features [B, T, D], state)` and `head(features) -> logits`: the losses apply the
head only where they need logits (MQAR scores a few answer positions per sequence).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mmrec.train.hardware import cpu_model, keep_freed_memory


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"device {torch.cuda.get_device_name(device)}"
    return f"CPU {cpu_model()}, torch threads {torch.get_num_threads()}"


@dataclass
class TrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, evaluate(model))
    seconds: float = 0.0
    diverged: bool = False


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    next_batch: Callable[[int], tuple[torch.Tensor, ...]],  # step -> batch (same batches for every model)
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    clip: float = 1.0,
    dtype: torch.dtype | None = None,  # autocast dtype, None = fp32
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,  # 0: evaluate only at the end
    log_every: int = 0,
    label: str = "",
) -> TrainResult:
    """AdamW (decay on matrices only), warm-up + cosine, gradient clipping; stops early on a NaN loss."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=lr, betas=betas,
    )
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()  # as the training loop does
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = next_batch(step)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        result.losses.append((step, value))
        if not math.isfinite(value):
            result.diverged = True
            break
        if log_every and (step + 1) % log_every == 0:
            print(f"  [{label}] step {step + 1}/{steps} loss {value:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            result.evals.append((step + 1, _evaluate(model, evaluate, device, dtype)))
    if evaluate is not None and not result.diverged:
        result.evals.append((len(result.losses), _evaluate(model, evaluate, device, dtype)))
    result.seconds = time.perf_counter() - start
    return result


def _evaluate(model, evaluate, device, dtype) -> dict[str, float]:
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        metrics = evaluate(model)
    model.train()
    return metrics


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (pastes into docs/benchmarks.md as is)."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
