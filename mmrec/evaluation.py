"""Scoring exports on held-out data: per-row next-token loss, perplexity and accuracy, any path.

    batches = validation_batches("runs/data/manifest.json", ("text",), batch_size=8, max_batches=8)
    table = score_paths(model, {"text": batches}, paths=("fused", "text", "code"))

Rows are scored one by one (sums of token losses), so any subset of rows aggregates exactly:
the same numbers give per-domain tables, mixed data, and an oracle that routes every row to the
expert of its own domain. Used by the pipeline's final table and by launchers.eval.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrec.train.loss import EvalResult

PATHS = ("fused", "text", "code")


@dataclass
class RowScores:
    """Per-row sums over the scored tokens of a list of batches."""

    nll: torch.Tensor  # [rows] float64: summed negative log-likelihood
    correct: torch.Tensor  # [rows] int64: tokens whose argmax prediction is the label
    tokens: torch.Tensor  # [rows] int64
    domains: list[str]  # [rows]

    def result(self, mask: Sequence[bool] | None = None) -> EvalResult:
        keep = torch.ones(len(self.domains), dtype=torch.bool) if mask is None else torch.tensor(list(mask))
        count = int(self.tokens[keep].sum())
        if count == 0:
            raise ValueError("no tokens to score in this selection")
        mean = float(self.nll[keep].sum()) / count
        return EvalResult(loss=mean, perplexity=math.exp(min(mean, 700.0)),
                          accuracy=int(self.correct[keep].sum()) / count, tokens=count)

    def domain(self, name: str) -> EvalResult:
        return self.result([d == name for d in self.domains])


@torch.no_grad()
def score_rows(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict],
               device: torch.device | str = "cpu", *, start_id: int | None = None) -> RowScores:
    """forward(inputs [B, T]) -> logits [B, T, V] scored on labels = tokens[:, 1:] of every batch.

    start_id (raw text: the EOS id): every row reads as a document start instead, inputs = start_id +
    tokens[:, :-1] scored on all of tokens, so a row's first token is predicted from EOS as the first
    token of a document is in training (and as lm-eval's loglikelihood_rolling scores a document)."""
    nll, correct, tokens, domains = [], [], [], []
    for batch in batches:
        ids = batch["tokens"].to(device)  # [B, T + 1]
        if start_id is not None:
            ids = torch.cat([torch.full_like(ids[:, :1], start_id), ids], dim=1)  # [B, T + 2]
        logits = forward(ids[:, :-1]).float()  # [B, T, V]
        labels = ids[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, T]
        nll.append(losses.double().sum(1).cpu())
        correct.append((logits.argmax(-1) == labels).sum(1).cpu())
        tokens.append(torch.full((ids.shape[0],), labels.shape[1], dtype=torch.int64))
        domains += list(batch.get("domains", ["?"] * ids.shape[0]))
    if not nll:
        raise ValueError("nothing to score: the data gave no batches")
    return RowScores(torch.cat(nll), torch.cat(correct), torch.cat(tokens), domains)


def model_paths(model: nn.Module) -> tuple[str, ...]:
    """The paths a model can be scored on: one expert ("expert"), or a fused model's three."""
    return PATHS if hasattr(model, "experts") else ("expert",)


def path_forward(model: nn.Module, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if path == "expert":
        return lambda ids: model(ids)[0]
    if path not in PATHS:
        raise ValueError(f"path {path!r}: choose one of {PATHS} (or 'expert' for a single expert)")
    return lambda ids: model(ids, expert=None if path == "fused" else path)[0]


def validation_batches(manifest: str, domains: Sequence[str], *, split: str = "val", batch_size: int = 8,
                       max_batches: int | None = None, max_tokens: int = 0) -> list[dict]:
    """Batches of the manifest's `split` over `domains` in the loader's deterministic order."""
    from mmrec.data import ShardLoader

    loader = ShardLoader(manifest, tuple(domains), split=split, micro_batch_size=batch_size, infinite=False,
                         prefetch=False)
    try:
        batches = []
        seen = 0
        for batch in itertools.islice(iter(loader), max_batches):
            batches.append(batch)
            seen += batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
            if max_tokens and seen >= max_tokens:
                break
        return batches
    finally:
        loader.close()


def oracle_routed(scores: dict[str, RowScores]) -> EvalResult:
    """Every row scored by the expert of its own domain: scores maps domain -> that expert's RowScores
    on the same rows (in the same order)."""
    reference = next(iter(scores.values()))
    nll = torch.zeros_like(reference.nll)
    correct = torch.zeros_like(reference.correct)
    for i, domain in enumerate(reference.domains):
        if domain not in scores:
            raise ValueError(f"row {i} is of domain {domain!r}, which no expert covers ({sorted(scores)})")
        nll[i], correct[i] = scores[domain].nll[i], scores[domain].correct[i]
    return RowScores(nll, correct, reference.tokens, reference.domains).result()
