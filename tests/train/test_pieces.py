"""Loss shift, schedule values, parameter groups."""
from __future__ import annotations

import pytest
import torch

from core.config import TrainConfig
from mmrec.train import build_param_groups, lm_loss, lr_multiplier
from mmrec.train.param_groups import block_index


def test_lm_loss_matches_manual_shifted_computation():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 9))
    logits = torch.randn(3, 8, 11, dtype=torch.float64)
    loss, correct = lm_loss(logits, tokens)
    manual, hits = 0.0, 0
    for b in range(3):
        for t in range(8):
            row = logits[b, t]
            manual += (torch.logsumexp(row, 0) - row[tokens[b, t + 1]]).item()
            hits += int(row.argmax() == tokens[b, t + 1])
    assert loss.item() == pytest.approx(manual / 24, rel=1e-6)
    assert int(correct) == hits
    # A roll would also score position T-1 against tokens[:, 0]: it gives a different value.
    rolled = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, :8].roll(-1, 1).reshape(-1))
    assert loss.item() != pytest.approx(rolled.item())


def test_lm_loss_rejects_unshifted_shapes():
    with pytest.raises(ValueError, match="tokens \\[B, T\\+1\\]"):
        lm_loss(torch.randn(2, 8, 5), torch.randint(0, 5, (2, 8)))


def test_schedule_values():
    kw = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)  # held after the end


def test_param_groups_decay_policy_lower_lr_and_scale():
    import mmrec

    model = mmrec.build_base(mmrec.get_config("tiny", d_model=32, n_layers=2, ffn_dim=64, n_heads=2, vocab_size=64))
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, lower_lr_first_n_layers=1, lower_lr_factor=0.25)
    groups = {g["name"]: g for g in build_param_groups(model, cfg, lr_scale=0.5)}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups.values():
        for p in group["params"]:
            name = names[id(p)]
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
            lower = block_index(name) == 0
            assert group["peak_lr"] == group["lr"] == pytest.approx(0.5 * (2.5e-4 if lower else 1e-3)), name
    assert {"decay", "no_decay", "decay_lower_lr", "no_decay_lower_lr"} <= set(groups)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    model.embedding.weight.requires_grad_(False)
    assert all(p is not model.embedding.weight for g in build_param_groups(model, cfg) for p in g["params"])
