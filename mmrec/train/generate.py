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
    top_p: float = 1.0,
) -> int:
    """temperature 0 -> argmax (greedy); otherwise softmax sampling over the top_k logits (all if None)
    and, with top_p < 1, over the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p: the first token always stays.
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
        probs = probs.index_put((order[drop],), torch.zeros(int(drop.sum())))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    step: StepFn,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_id: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Up to max_new_tokens ids sampled after `prompt_ids` (the prompt itself is not returned); sampling
    stops after `stop_id` (the end-of-text token) when it is given, which is then not returned."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (the model has no begin-of-sequence token)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = step(torch.tensor([prompt_ids], dtype=torch.long, device=device), None)  # [1, P, V]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if token == stop_id:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits, state = step(torch.tensor([[token]], dtype=torch.long, device=device), state)  # [1, 1, V]
    return out
