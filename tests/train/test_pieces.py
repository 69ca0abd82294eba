"""Loss shift, schedule values, config validation, parameter groups, the token stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrec.train import ConfigError, TokenStream, TrainConfig, build_param_groups, lm_loss, lr_multiplier
from mmrec.train.param_groups import block_index
from mmrec.train.schedule import build_scheduler


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


def test_lambdalr_factory_follows_pure_function_per_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(lr=1.0, warmup_steps=3, max_steps=9, min_lr_ratio=0.2)
    opt = torch.optim.SGD([dict(params=[p1], lr=1.0), dict(params=[p2], lr=0.5)])
    sched = build_scheduler(opt, cfg)
    for step in range(12):
        expected = lr_multiplier(step, warmup_steps=3, max_steps=9, min_lr_ratio=0.2)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * expected)
        opt.step()
        sched.step()


def test_config_validation_and_overrides():
    with pytest.raises(ConfigError, match="unknown TrainConfig key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="unknown TrainConfig key 'foo'"):
        TrainConfig().override("foo=1")
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=20, max_steps=10)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="cannot parse max_steps='ten'"):
        TrainConfig().override("max_steps=ten")
    cfg = TrainConfig.for_stage("stage2-code").override("lr=5e-5", "bf16=true", "betas=0.8,0.9", "max_steps=3000")
    assert (cfg.lr, cfg.bf16, cfg.betas, cfg.max_steps, cfg.warmup_steps) == (5e-5, True, (0.8, 0.9), 3000, 2000)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_param_groups_decay_policy_and_lower_lr(model_cfg):
    import mmrec

    model = mmrec.build_base(model_cfg)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, lower_lr_first_n_layers=1, lower_lr_factor=0.25)
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups.values():
        for p in group["params"]:
            name = names[id(p)]
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
            lower = block_index(name) == 0
            assert group["lr"] == pytest.approx(2.5e-4 if lower else 1e-3), name
    assert {"decay", "no_decay", "decay_lower_lr", "no_decay_lower_lr"} <= set(groups)
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == len(list(model.parameters()))
    model.embedding.weight.requires_grad_(False)
    assert all(p is not model.embedding.weight for g in build_param_groups(model, cfg) for p in g["params"])


def test_token_stream_order_depends_only_on_seed_epoch_and_resumes():
    tokens = {"text": np.arange(10 * 9), "code": np.arange(1000, 1000 + 6 * 9)}
    whole = TokenStream(tokens, seq_len=8, local_batch=2, seed=3)
    seen = [b["tokens"] for _, b in zip(range(12), whole)]
    # Two ranks of batch 1 see, together, exactly what one rank of batch 2 sees.
    ranks = [TokenStream(tokens, seq_len=8, local_batch=1, seed=3, rank=r, world_size=2) for r in range(2)]
    for batch, parts in zip(seen, zip(*[[b["tokens"] for _, b in zip(range(12), s)] for s in ranks])):
        assert torch.equal(batch, torch.cat(parts))
    # Resume mid-epoch from a state dict.
    first = TokenStream(tokens, seq_len=8, local_batch=2, seed=3)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = TokenStream(tokens, seq_len=8, local_batch=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b["tokens"]) for a, (_, b) in zip(seen[5:], zip(range(7), resumed)))
    assert seen[0][:, 1:].sub(seen[0][:, :-1]).eq(1).all()  # samples are contiguous slices
    assert whole.epoch == 1  # 8 batches per epoch: 12 batches crossed into epoch 1
    other = TokenStream({"text": np.arange(10 * 9) + 1}, seq_len=8, local_batch=2, seed=3)
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(first.state_dict())
