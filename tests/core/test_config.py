"""The one config tree: strict types, named unknown keys, stage resolution order, --set, TOML round trip."""
from __future__ import annotations

import tomllib

import pytest

from core.config import Config, ConfigError, load_config, resolve, toml_text
from core.stages import STAGES


def test_stage_resolution_order_preset_file_stage_table_then_set(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\nlr = 1e-3\nmax_steps = 50\n[stages.stage2-text.train]\nlr = 2e-3\nwarmup_steps = 5\n')
    cfg = load_config(path, stage="stage2-text", overrides=["train.max_steps=40"])
    assert cfg.train.lr == 2e-3  # the stage's table wins over the file's [train]
    assert cfg.train.max_steps == 40  # --set wins over everything
    assert cfg.train.weight_decay == STAGES["stage2-text"].preset["weight_decay"]  # the preset fills the rest
    other = load_config(path, stage="stage1", overrides=["train.warmup_steps=5"])
    assert other.train.lr == 1e-3 and other.train.seq_len == STAGES["stage1"].preset["seq_len"]
    staged = load_config(path, stage="stage2-text", overrides=["stages.stage2-text.train.lr=5e-4"])
    assert staged.train.lr == 5e-4  # --set into a stage table edits that table


@pytest.mark.parametrize("values, message", [
    ({"trian": {}}, r"unknown key 'trian' in the top level \(did you mean 'train'\?\)"),
    ({"train": {"lrr": 1.0}}, r"unknown key 'lrr' in \[train\] \(did you mean 'lr'\?\)"),
    ({"train": {"lr": "1e-3"}}, r"train.lr='1e-3': must be a finite number"),
    ({"train": {"max_steps": 10.0}}, r"train.max_steps=10.0: must be an integer"),
    ({"train": {"max_steps": True}}, r"train.max_steps=True: must be an integer"),
    ({"run": {"tensorboard": "yes"}}, r"run.tensorboard='yes': must be true or false"),
    ({"run": {"tensorboard": 1}}, r"run.tensorboard=1: must be true or false"),
    ({"engine": {"kind": "fsdp"}}, r"engine.kind='fsdp': must be 'torch' or 'deepspeed'"),
    ({"train": {"lr": -1.0}}, r"train.lr=-1.0: must be > 0"),
    ({"train": {"warmup_steps": 20, "max_steps": 10}}, r"warmup_steps=20 must be <= train.max_steps"),
    ({"scaling": {"num_workers": 2}}, r"engine.kind='torch' runs one process"),
    ({"engine": {"kind": "deepspeed", "zero_stage": 1, "offload_param": True}}, r"offload_param=true needs engine.zero_stage=3"),
    ({"stages": {"stage9": {}}}, r"\[stages.stage9\]: unknown stage"),
    ({"stages": {"stage3": {"train": {"foo": 1}}}}, r"unknown key 'foo' in \[stages.stage3.train\]"),
    ({"model": {"seq_len": 64}}, r"model.seq_len: the model's training length is train.seq_len"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve(values, stage="stage1")


@pytest.mark.parametrize("assignment, message", [
    ("train.lr=abc", r"train.lr='abc': must be a number"),
    ("train.bogus=1", r"unknown key 'bogus' in \[train\]"),
    ("run.tensorboard=yes", r"run.tensorboard='yes': must be true or false"),
    ("train", r"not of the form section.key=value"),
    ("train.lr", r"not of the form section.key=value"),
    ("train.seq_len=1.5", r"train.seq_len='1.5': must be an integer"),
    ("train.lr.x=1", r"train.lr is a value, not a table"),
])
def test_bad_overrides_are_named(assignment, message):
    with pytest.raises(ConfigError, match=message):
        resolve({}, stage="stage1", overrides=[assignment])


def test_overrides_parse_by_field_type_and_model_keys_are_free_form():
    cfg = resolve({}, stage="stage1", overrides=[
        "train.betas=0.8,0.9", "run.tensorboard=true", "fault.nan_at_steps=[3, 5]", "model.d_model=32",
        "model.name=small", "prep.sources=demo,dir:/x"])
    assert cfg.train.betas == (0.8, 0.9) and cfg.run.tensorboard is True and cfg.fault.nan_at_steps == (3, 5)
    assert cfg.model == {"name": "small", "d_model": 32} and cfg.model_overrides == {"d_model": 32}
    assert cfg.prep.sources == ("demo", "dir:/x")


def test_printed_config_loads_back_to_the_same_tree(tmp_path):
    cfg = resolve({"train": {"lr": 2e-3}, "stages": {"stage3": {"train": {"lr": 1e-4}}}}, stage="stage2-code",
                  overrides=["model.d_model=48", "prep.sources=demo"])
    text = toml_text(cfg.to_dict())
    assert Config.from_dict(tomllib.loads(text)) == cfg


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)
    staged = tmp_path / "staged.toml"
    staged.write_text('stage = "stage1"\n')
    with pytest.raises(ConfigError, match="--stage stage3 contradicts"):
        load_config(staged, stage="stage3")


def test_the_smoke_config_resolves_for_every_stage():
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"
    for stage in STAGES:
        cfg = load_config(smoke, stage=stage)
        assert cfg.engine.kind == "deepspeed" and cfg.train.seq_len == 64
    assert load_config(smoke, stage="stage2-text").train.lr == 2e-3
