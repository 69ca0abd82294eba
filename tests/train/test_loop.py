"""The one training loop with the torch engine: accumulation, freezing, lower LR, exact resume, changed
hyper-parameters on resume, early stopping, best/latest exports, NaN rollback, the host-sync budget."""
from __future__ import annotations

import math

import pytest
import torch

from core.config import ConfigError
from mmrec.train import NonFiniteLossError, Trainer, build_from_export, evaluate, read_export
from mmrec.train.checkpoint import list_checkpoints, read_pointer
from mmrec.train.engine import TorchEngine
from mmrec.train.records import read_records
from mmrec.train.stage_setup import prepare_stage, resolve_model_config
from mmrec.train.export import export_module

from .conftest import BATCH, SEQ_LEN, make_config


def _train_losses(run_url):
    return [(r["step"], r["loss"], r["lr"]) for r in read_records(run_url) if r["kind"] == "train"]


def _stop_at(trainer: Trainer, step: int) -> Trainer:
    """Ask the trainer to stop after `step`, as the SIGINT handler of launchers.train does."""
    original = trainer._train_step

    def train_step(*args, **kwargs):
        stats = original(*args, **kwargs)
        if stats["step"] == step:
            trainer.request_stop("SIGINT")
        return stats

    trainer._train_step = train_step
    return trainer


def test_grad_accumulation_equals_the_big_batch(manifest, tmp_path):
    cfg = make_config(manifest, tmp_path, train={"grad_clip": 0.0})
    model_cfg = resolve_model_config(cfg, None).replace(vocab_size=300)
    tokens = torch.randint(0, 300, (4, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    results = []
    for accum, micro in ((1, 4), (2, 2)):
        setup = prepare_stage("stage1", model_cfg, cfg.train)  # same seed: same initial weights
        engine = TorchEngine(setup, cfg.train, grad_accum=accum, device=torch.device("cpu"), autocast_dtype=None)
        losses = [engine.forward_backward(part) for part in tokens.split(micro)]
        grads = {n: p.grad.clone() for n, p in setup.model.named_parameters()}
        results.append((sum(float(x) for x in losses) / accum, grads))
    (big_loss, big), (acc_loss, acc) = results
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


def _base_export(manifest, tmp_path):
    cfg = make_config(manifest, tmp_path)
    from core.manifest import load_manifest

    model_cfg = resolve_model_config(cfg, load_manifest(manifest))
    setup = prepare_stage("stage1", model_cfg, cfg.train)
    return export_module(tmp_path / "base", setup.model, kind="expert", model_config=model_cfg, stage="stage1")


def test_stage2_trains_only_its_expert_and_frozen_layers_stay_bit_identical(manifest, tmp_path):
    base = _base_export(manifest, tmp_path)
    cfg = make_config(manifest, tmp_path / "runs", stage="stage2-text", run={"init_from": str(base)},
                      train={"freeze_first_n_layers": 1, "max_steps": 3, "eval_every": 0, "warmup_steps": 1})
    result = Trainer(cfg).fit()
    before, after = read_export(base).state_dict, read_export(result.latest_export).state_dict
    assert set(after) == set(before)  # the export is the text expert alone, in the base's layout
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(not n.startswith("blocks.0.") for n in changed)
    assert "embedding.weight" in changed and any(n.startswith("blocks.1.") for n in changed)


def test_lower_lr_layers_move_by_the_factor_on_the_first_adam_step(manifest, tmp_path):
    base = _base_export(manifest, tmp_path)
    cfg = make_config(manifest, tmp_path, stage="stage2-code", run={"init_from": str(base)},
                      train={"lower_lr_first_n_layers": 1, "lower_lr_factor": 0.25, "warmup_steps": 0,
                             "weight_decay": 0.0, "grad_clip": 0.0})
    from core.manifest import load_manifest

    model_cfg = resolve_model_config(cfg, load_manifest(manifest))
    setup = prepare_stage("stage2-code", model_cfg, cfg.train, init_from=str(base))
    engine = TorchEngine(setup, cfg.train, grad_accum=1, device=torch.device("cpu"), autocast_dtype=None)
    code = setup.model.experts["code"]
    before = {n: p.detach().clone() for n, p in code.named_parameters()}
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    engine.forward_backward(tokens)
    engine.optimizer_step(1.0)
    after = dict(code.named_parameters())
    # Adam's first update is lr * g / (|g| + eps): about lr per element with a non-tiny gradient.
    step0 = (after["blocks.0.in_proj.weight"] - before["blocks.0.in_proj.weight"]).abs().max().item()
    step1 = (after["blocks.1.in_proj.weight"] - before["blocks.1.in_proj.weight"]).abs().max().item()
    assert step1 == pytest.approx(cfg.train.lr, rel=1e-3)
    assert step0 == pytest.approx(0.25 * cfg.train.lr, rel=1e-3)


def test_resume_after_a_stop_reproduces_the_uninterrupted_run_bit_for_bit(manifest, tmp_path):
    whole = Trainer(make_config(manifest, tmp_path, run={"name": "whole"})).fit()
    cut = make_config(manifest, tmp_path, run={"name": "cut"})
    stopped = _stop_at(Trainer(cut), 6).fit()  # checkpoints at 4 and at the stop, 6
    assert stopped.interrupted == "SIGINT" and stopped.step == 6
    resumed = Trainer(cut).fit()  # fresh model, optimizer, loader
    assert "/step_00000006-" in resumed.resumed_from
    assert _train_losses(resumed.run_url) == _train_losses(whole.run_url)  # bitwise, steps 1..8 once each
    w, r = read_export(whole.latest_export).state_dict, read_export(resumed.latest_export).state_dict
    assert all(torch.equal(w[k], r[k]) for k in w)


def test_a_changed_lr_or_max_steps_on_resume_is_applied(manifest, tmp_path, caplog):
    cfg = make_config(manifest, tmp_path, train={"checkpoint_every": 4, "max_steps": 8})
    _stop_at(Trainer(cfg), 4).fit()
    changed = make_config(manifest, tmp_path, train={"lr": 1e-3, "max_steps": 12})
    with caplog.at_level("INFO", logger="mmrec.train"):
        Trainer(changed).fit()
    assert "lr 0.003 -> 0.001" in caplog.text and "max_steps 8 -> 12" in caplog.text
    from mmrec.train.schedule import lr_multiplier

    for step, _, lr in _train_losses(str(tmp_path / "stage1")):
        if step > 4:  # the new peak and the new length decide the schedule from the resume on
            assert lr == pytest.approx(1e-3 * lr_multiplier(step - 1, warmup_steps=2, max_steps=12, min_lr_ratio=0.1))


def test_resume_refuses_another_model_or_sequence_length(manifest, tmp_path):
    _stop_at(Trainer(make_config(manifest, tmp_path)), 4).fit()
    with pytest.raises(ConfigError, match="another model config"):
        Trainer(make_config(manifest, tmp_path, model={"ffn_dim": 96})).fit()


def test_model_vocabulary_comes_from_the_manifest_or_is_refused(manifest, tmp_path):
    from core.manifest import load_manifest

    vocab = load_manifest(manifest).vocab_size
    trainer = Trainer(make_config(manifest, tmp_path))
    assert trainer.model_cfg.vocab_size == vocab != 4096  # the tiny preset says 4096
    with pytest.raises(ConfigError, match=rf"model.vocab_size=4096 but the dataset's tokenizer has {vocab} pieces"):
        Trainer(make_config(manifest, tmp_path, model={"vocab_size": 4096}))


def test_early_stopping_checkpoints_and_keeps_the_best_export(manifest, tmp_path):
    # min_delta larger than any achievable change: every evaluation after the first counts as no improvement.
    cfg = make_config(manifest, tmp_path, train={"eval_every": 1, "early_stopping_patience": 2,
                                                 "early_stopping_min_delta": 100.0, "max_steps": 8})
    result = Trainer(cfg).fit()
    assert result.stopped_early and result.step == 3
    assert read_export(result.best_export).info["step"] == 1  # only the first evaluation "improved"
    assert read_pointer(result.run_url, "latest") == "step_00000003"
    assert "step_00000003" in list_checkpoints(result.run_url)[0]  # stopping still checkpoints
    evals = [r for r in read_records(result.run_url) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3] and [r["best"] for r in evals] == [True, False, False]


def test_best_export_holds_the_lowest_validation_loss_weights(manifest, tmp_path):
    cfg = make_config(manifest, tmp_path, train={"eval_every": 2, "lr": 2e-2})
    trainer = Trainer(cfg)
    result = trainer.fit()
    evals = [r for r in read_records(result.run_url) if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    export = read_export(result.best_export)
    assert export.kind == "expert" and export.info["step"] == best["step"]
    model = build_from_export(export)
    again = evaluate(model, trainer.val_batches, lambda x: model(x)[0])
    assert again.loss == pytest.approx(best["val_loss"], rel=1e-6)
    assert again.perplexity == pytest.approx(math.exp(best["val_loss"]), rel=1e-6)


def test_nan_loss_rolls_back_to_the_last_checkpoint_at_a_lower_lr(manifest, tmp_path):
    clean = Trainer(make_config(manifest, tmp_path, run={"name": "clean"})).fit()
    result = Trainer(make_config(manifest, tmp_path, run={"name": "nan"}, fault={"nan_at_steps": [6]})).fit()
    got, want = _train_losses(result.run_url), _train_losses(clean.run_url)
    assert [s for s, _, _ in got] == list(range(1, 9))  # steps 5.. were trained again after the rollback
    assert got[:4] == want[:4]
    for (_, _, lr), (_, _, lr_clean) in zip(got[4:], want[4:]):
        assert lr == pytest.approx(0.5 * lr_clean, rel=1e-9)
    import json

    from core import storage

    info = json.loads(storage.read_text(storage.join(result.run_url, list_checkpoints(result.run_url)[0], "run.json")))
    assert info["nan_rollbacks"] == 1 and info["lr_scale"] == 0.5


def test_repeated_nan_fails_with_a_clear_message(manifest, tmp_path):
    cfg = make_config(manifest, tmp_path, fault={"nan_at_steps": [2], "nan_times": 100},
                      fault_tolerance={"nan_max_rollbacks": 2})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 after 2 rollbacks .* lower train.lr"):
        Trainer(cfg).fit()


def test_one_host_read_per_optimizer_step(manifest, tmp_path, monkeypatch):
    """The project's code reads tensor values once per step (the summary tensor), never per micro-batch.

    Reads made inside torch itself are not counted (AdamW reads its step counters, which live on the
    host even for GPU parameters); every read made by our code is.
    """
    import sys
    from pathlib import Path

    project = str(Path(__file__).resolve().parents[2])
    from mmrec.metrics import ExporterOptions, MetricsExporter

    cfg = make_config(manifest, tmp_path, train={"grad_accum_steps": 3, "eval_every": 0, "max_steps": 4,
                                                 "checkpoint_every": 0})
    # With an exporter, logged steps also carry the per-layer state norms: in the same single read.
    trainer = Trainer(cfg, metrics=MetricsExporter(stage="stage1", expert="base", config=ExporterOptions(serve=False)))
    trainer._start(None)
    data = iter(trainer.loader)
    next(data)  # the loader's first read is not the step's business
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(project) and "/.venv/" not in caller:
                reads.append(f"{_name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.setattr("mmrec.model.expert.check_token_ids", lambda ids, vocab: None)  # a CPU-only range check
    for log_step in (False, True):
        reads.clear()
        trainer._train_step(data, log_step)
        assert len(reads) == 1 and reads[0].startswith("tolist in loop.py"), reads
