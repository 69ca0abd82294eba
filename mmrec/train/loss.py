"""Next-token loss and validation: shared by the single-process Trainer and the distributed loops."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# forward(inputs [B, T]) -> logits [B, T, V]; the stage decides which path of the model it runs.
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy and the number of correctly predicted tokens.

    logits: [B, T, V], computed from inputs = tokens[:, :-1]
    tokens: [B, T + 1]; labels = tokens[:, 1:] (a shift, never a roll: the last input has no
            wrap-around target and the first token is never a label)
    returns (loss: fp32 scalar, correct: int64 scalar)
    """
    if tokens.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(
            f"lm_loss expects logits [B, T, V] and tokens [B, T+1]; got logits {tuple(logits.shape)} and "
            f"tokens {tuple(tokens.shape)} (pass the full sample, the function shifts it)"
        )
    labels = tokens[:, 1:]  # [B, T]
    logits32 = logits.float()  # bf16 logits would lose precision in the log-softmax
    loss = F.cross_entropy(logits32.reshape(-1, logits32.shape[-1]), labels.reshape(-1))
    correct = (logits32.argmax(dim=-1) == labels).sum()
    return loss, correct


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean per-token cross-entropy over all evaluated tokens
    perplexity: float
    accuracy: float  # fraction of tokens whose argmax prediction is the label
    tokens: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], forward: ForwardFn) -> EvalResult:
    """Token-weighted loss, perplexity and accuracy of `forward` over `batches`.

    The model is put in eval mode for the pass and every submodule's own mode is restored afterwards
    (frozen experts stay in eval mode during stage 3).
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            tokens = batch["tokens"]
            logits = forward(tokens[:, :-1])  # the forward moves its inputs to the model's device
            loss, n_correct = lm_loss(logits, tokens.to(logits.device))
            n = tokens.shape[0] * (tokens.shape[1] - 1)
            loss_sum += loss.item() * n
            correct += int(n_correct)
            count += n
    finally:
        for module, mode in modes.items():
            module.training = mode
    if count == 0:
        raise ValueError("evaluate() got no batches: the validation loader is empty")
    mean = loss_sum / count
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 700.0)), accuracy=correct / count, tokens=count)
