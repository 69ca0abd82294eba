"""The Trainer loop: accumulation, freezing, lower LR, exact resume, early stopping, best export, NaN."""
from __future__ import annotations

import math

import pytest
import torch

from mmrec.train import NonFiniteLossError, Trainer, build_from_export, evaluate, prepare_stage, read_export
from mmrec.train.export import export_weights

from .conftest import BATCH, SEQ_LEN


def _base_export(tmp_path, model_cfg, train_cfg):
    setup = prepare_stage("stage1", model_cfg, train_cfg)
    return export_weights(tmp_path / "base", setup.model, kind="expert", model_config=setup.model_config,
                          stage="stage1", step=0)


def test_grad_accumulation_equals_big_batch(model_cfg, train_cfg, tmp_path):
    tokens = torch.randint(0, model_cfg.vocab_size, (4, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    grads = []
    for accum, micro in ((1, 4), (2, 2)):
        cfg = train_cfg.replace(grad_accum_steps=accum, micro_batch_size=micro, grad_clip=0.0)
        setup = prepare_stage("stage1", model_cfg, cfg)  # same seed -> same initial weights
        trainer = Trainer(setup, cfg, [], out_dir=tmp_path / f"a{accum}", log=lambda _: None)
        stats = trainer.train_step(iter([dict(tokens=t, domains=["text"] * micro) for t in tokens.split(micro)]))
        grads.append(({n: p.grad.clone() for n, p in setup.model.named_parameters()}, stats["loss"]))
    (big, big_loss), (acc, acc_loss) = grads
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_stage2_freezing_keeps_frozen_params_bit_identical(model_cfg, train_cfg, streams, tmp_path):
    base = _base_export(tmp_path, model_cfg, train_cfg)
    cfg = train_cfg.replace(freeze_first_n_layers=1, max_steps=3, eval_every=0, checkpoint_every=0)
    setup = prepare_stage("stage2-text", model_cfg, cfg, init_from=base)
    before = _params(setup.model)
    train, _ = streams(domains=("text",))
    Trainer(setup, cfg, train, out_dir=tmp_path / "run", log=lambda _: None).fit()
    after = _params(setup.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for name in before:
        frozen = (not name.startswith("experts.text.")) or name.startswith("experts.text.blocks.0.")
        assert (name not in changed) == frozen, name
    assert "experts.text.embedding.weight" in changed and "experts.text.blocks.1.in_proj.weight" in changed
    assert not setup.model.experts["code"].training and not setup.model.experts["text"].blocks[0].training


def test_lower_lr_layers_move_by_factor_on_first_adam_step(model_cfg, train_cfg, streams, tmp_path):
    base = _base_export(tmp_path, model_cfg, train_cfg)
    cfg = train_cfg.replace(lower_lr_first_n_layers=1, lower_lr_factor=0.25, warmup_steps=1, weight_decay=0.0,
                            grad_clip=0.0, max_steps=4)
    setup = prepare_stage("stage2-code", model_cfg, cfg, init_from=base)
    before = _params(setup.model.experts["code"])
    train, _ = streams(domains=("code",))
    trainer = Trainer(setup, cfg, train, out_dir=tmp_path / "run", log=lambda _: None)
    trainer.train_step(iter(train))
    after = _params(setup.model.experts["code"])
    # Adam's first update is lr * g / (|g| + eps), i.e. about lr per element with a non-tiny gradient.
    step0 = (after["blocks.0.in_proj.weight"] - before["blocks.0.in_proj.weight"]).abs().max().item()
    step1 = (after["blocks.1.in_proj.weight"] - before["blocks.1.in_proj.weight"]).abs().max().item()
    assert step1 == pytest.approx(cfg.lr, rel=1e-3)
    assert step0 == pytest.approx(0.25 * cfg.lr, rel=1e-3)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["decay_lower_lr"] == pytest.approx(0.25 * lrs["decay"])


class _KillAtStep:
    """Stands in for a crash: raises from the metrics hook once `step` is reached (after earlier checkpoints)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, *, step, **_):
        if step == self.step:
            raise KeyboardInterrupt("simulated crash")

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_exact_resume_reproduces_uninterrupted_losses(model_cfg, train_cfg, streams, tmp_path):
    def run(out, metrics=None):
        setup = prepare_stage("stage1", model_cfg, train_cfg)
        train, val = streams(seed=0)
        return Trainer(setup, train_cfg, train, val, out_dir=out, metrics=metrics, log=lambda _: None).fit()

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", metrics=_KillAtStep(6))  # checkpoint at 4, dies during step 6
    resumed = run(tmp_path / "cut")  # fresh model, optimizer and loader objects
    assert resumed.resumed_from.name == "step_00000004"
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[4:]]  # bitwise
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history[4:]]
    w = read_export(whole.final_export).state_dict
    r = read_export(resumed.final_export).state_dict
    assert all(torch.equal(w[k], r[k]) for k in w)


def test_early_stopping_and_best_export(model_cfg, train_cfg, streams, tmp_path):
    # min_delta larger than any achievable change: every evaluation after the first counts as no improvement.
    cfg = train_cfg.replace(eval_every=1, early_stopping_patience=2, early_stopping_min_delta=100.0, max_steps=8)
    setup = prepare_stage("stage1", model_cfg, cfg)
    train, val = streams()
    trainer = Trainer(setup, cfg, train, val, out_dir=tmp_path / "run", log=lambda _: None)
    result = trainer.fit()
    assert result.stopped_early and result.step == 3 and len(result.evals) == 3
    assert read_export(result.best_export).info["step"] == 1  # only the first evaluation "improved"
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()  # stopping still checkpoints


def test_best_export_holds_the_lowest_validation_loss_weights(model_cfg, train_cfg, streams, tmp_path):
    cfg = train_cfg.replace(eval_every=2, max_steps=8, lr=2e-2)
    setup = prepare_stage("stage1", model_cfg, cfg)
    train, val = streams()
    trainer = Trainer(setup, cfg, train, val, out_dir=tmp_path / "run", log=lambda _: None)
    result = trainer.fit()
    best_step, best = min(result.evals, key=lambda e: e[1].loss)
    export = read_export(result.best_export)
    assert export.kind == "expert" and export.info["step"] == best_step
    model = build_from_export(export)
    again = evaluate(model, trainer.val_batches, lambda x: model(x)[0])
    assert again.loss == pytest.approx(best.loss, rel=1e-6)
    assert again.perplexity == pytest.approx(math.exp(best.loss), rel=1e-6)
    assert export.info["metrics"]["val_loss"] == pytest.approx(best.loss)


def test_nan_loss_raises_a_clear_error(model_cfg, train_cfg, streams, tmp_path):
    setup = prepare_stage("stage1", model_cfg, train_cfg)
    forward = setup.forward
    setup.forward = lambda x: forward(x) * float("nan")  # fault injection: the model itself is real
    train, _ = streams()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1; lower lr"):
        Trainer(setup, train_cfg, train, out_dir=tmp_path / "run", log=lambda _: None).fit()


def test_wrong_batch_shape_is_a_clear_error(model_cfg, train_cfg, streams, tmp_path):
    setup = prepare_stage("stage1", model_cfg, train_cfg)
    train, _ = streams(batch=BATCH + 1)
    with pytest.raises(ValueError, match=r"micro_batch_size, seq_len \+ 1"):
        Trainer(setup, train_cfg, train, out_dir=tmp_path / "run", log=lambda _: None).fit()


def test_metrics_hooks_receive_steps_evals_checkpoints_and_norms(model_cfg, train_cfg, streams, tmp_path):
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda **kw: calls.append((name, kw))

    setup = prepare_stage("stage1", model_cfg, train_cfg)
    train, val = streams()
    Trainer(setup, train_cfg, train, val, out_dir=tmp_path / "run", metrics=Recorder(), log=lambda _: None).fit()
    kinds = [name for name, _ in calls]
    assert kinds.count("on_step") == 8 and kinds.count("on_state_norms") == 8 and kinds.count("on_eval") == 2
    assert [kw["step"] for name, kw in calls if name == "on_checkpoint"] == [4, 8]
    step = next(kw for name, kw in calls if name == "on_step")
    assert step["tokens"] == BATCH * SEQ_LEN and step["flops_per_token"] > 0 and math.isfinite(step["loss"])
    norms = next(kw for name, kw in calls if name == "on_state_norms")
    assert len(norms["h_norms"]) == model_cfg.n_layers and all(v > 0 for v in norms["h_norms"])


def _one_step_grads(model_cfg, cfg, tokens, tmp_path):
    setup = prepare_stage("stage1", model_cfg, cfg)
    trainer = Trainer(setup, cfg, [], out_dir=tmp_path, log=lambda _: None)
    stats = trainer.train_step(iter([dict(tokens=tokens, domains=["text"] * len(tokens))]))
    return stats["loss"], {n: p.grad.clone() for n, p in setup.model.named_parameters()}, setup


def test_bf16_autocast_and_activation_checkpointing_switches(model_cfg, train_cfg, tmp_path):
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(2))
    loss32, grads32, _ = _one_step_grads(model_cfg, train_cfg, tokens, tmp_path / "a")
    loss_ckpt, grads_ckpt, setup = _one_step_grads(
        model_cfg, train_cfg.replace(activation_checkpointing=True), tokens, tmp_path / "b")
    assert setup.model.gradient_checkpointing
    assert loss_ckpt == loss32  # recomputation changes memory, not results
    for name in grads32:
        torch.testing.assert_close(grads_ckpt[name], grads32[name], rtol=1e-5, atol=1e-7, msg=name)
    loss16, grads16, _ = _one_step_grads(model_cfg, train_cfg.replace(bf16=True), tokens, tmp_path / "c")
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-2)  # autocast was on, and sane
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads16.values())  # fp32 master grads


def test_trainer_feeds_the_real_metrics_exporter(model_cfg, train_cfg, streams, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from mmrec.metrics import MetricsExporter
    from mmrec.metrics.exporter import MetricsConfig

    exporter = MetricsExporter(stage="stage1", expert="base", config=MetricsConfig(serve=False))
    setup = prepare_stage("stage1", model_cfg, train_cfg)
    train, val = streams()
    result = Trainer(setup, train_cfg, train, val, out_dir=tmp_path, metrics=exporter, log=lambda _: None).fit()
    samples = {s.name: s.value for f in text_string_to_metric_families(exporter.exposition().decode()) for s in f.samples}
    assert samples["mmrec_train_step"] == 8
    assert samples["mmrec_train_loss"] == pytest.approx(result.history[-1]["loss"])
    assert samples["mmrec_tokens_total"] == 8 * BATCH * SEQ_LEN
    assert samples["mmrec_validation_loss"] == pytest.approx(result.evals[-1][1].loss)
