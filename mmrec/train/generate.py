"""Sampling from a trained model with its recurrent state: the prompt is run once, then one token at
a time, never re-running the prefix (the state carries everything the model knows about it)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# step(ids [1, T], state) -> (logits [1, T, V], new_state)
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def step_fn_for(model: nn.Module, expert: str | None = None) -> StepFn:
    """The streaming forward of an Expert (expert must be None) or of an MMRec path ("text"/"code"/None=fused)."""
    if hasattr(model, "experts"):
        return lambda ids, state: model(ids, expert=expert, state=state)
    if expert is not None:
        raise ValueError(f"this export is a single expert; --expert {expert!r} only applies to a fused (stage-3) model")
    return lambda ids, state: model(ids, state=state)


def sample_next(
    logits: torch.Tensor,  # [V] for the next position
    *,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> int:
    """temperature 0 -> argmax (greedy); otherwise softmax sampling over the top_k logits (all if None)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(
    step: StepFn,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """The max_new_tokens ids sampled after `prompt_ids` (the prompt itself is not returned)."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (the model has no begin-of-sequence token)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = step(torch.tensor([prompt_ids], dtype=torch.long), None)  # [1, P, V]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, generator=generator)
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits, state = step(torch.tensor([[token]], dtype=torch.long), state)  # [1, 1, V]
    return out
