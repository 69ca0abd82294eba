"""JobConfig validation and the DeepSpeed config derived from it (fast, no Ray)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, JobConfig, load_job_config
from cluster.deepspeed_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


def _job(**sections) -> JobConfig:
    return JobConfig.from_dict({"stage": "stage1", "data": {"manifest": "m.json"}, **sections})


def test_smoke_file_loads_for_every_stage_with_its_inputs():
    for stage, extra in (("stage1", []), ("stage2-code", ["run.init_from=/x"]),
                         ("stage3", ["run.init_from_text=/t", "run.init_from_code=/c"])):
        job = load_job_config(SMOKE, stage=stage, overrides=["data.manifest=/m.json", *extra])
        assert job.stage == stage and job.zero.stage == 2 and job.zero.offload_optimizer
        assert job.model_config().seq_len == job.train.seq_len == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.learning_rate=1"], "learning_rate"),
        (["zero.stages=3"], "stages"),
        (["zeros.stage=3"], "zeros"),
        (["model.widht=3"], "widht"),
        (["zero.stage=5"], "zero.stage=5"),
        (["zero.offload_param=true"], "offload_param"),
        (["scaling.min_workers=3"], "min_workers"),
        (["train.lr"], "section.key=value"),
        (["fault.nan_at_steps=0"], "nan_at_steps"),
    ],
)
def test_wrong_keys_and_values_are_errors_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(SMOKE, stage="stage1", overrides=["data.manifest=/m.json", *overrides])


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[zero]\nstage = 1\noffload_optimiser = true\n')
    with pytest.raises(ConfigError, match="offload_optimiser"):
        load_job_config(path, stage="stage1", overrides=["data.manifest=/m"])
    path.write_text('[zeroo]\nstage = 1\n')
    with pytest.raises(ConfigError, match="zeroo"):
        load_job_config(path, stage="stage1", overrides=["data.manifest=/m"])


def test_missing_inputs_are_named():
    with pytest.raises(ConfigError, match="data.manifest"):
        load_job_config(SMOKE, stage="stage1")
    with pytest.raises(ConfigError, match="run.init_from"):
        load_job_config(SMOKE, stage="stage2-text", overrides=["data.manifest=/m"])
    with pytest.raises(ConfigError, match="init_from_text"):
        load_job_config(SMOKE, stage="stage3", overrides=["data.manifest=/m"])


def test_round_trip_through_a_plain_dict():
    job = load_job_config(SMOKE, stage="stage3", overrides=[
        "data.manifest=/m", "run.init_from_text=/t", "run.init_from_code=/c", "fault.nan_at_steps=3,5", "zero.stage=3",
        "zero.offload_param=true", "model.n_layers=3",
    ])
    again = JobConfig.from_dict(job.to_dict())
    assert again == job
    assert again.fault.nan_at_steps == (3, 5) and again.model_config().n_layers == 3


def test_deepspeed_config_follows_ours():
    job = _job(train={"micro_batch_size": 4, "grad_accum_steps": 3, "grad_clip": 0.5, "bf16": True},
               zero={"stage": 3, "offload_optimizer": True, "offload_param": True}, scaling={"num_workers": 2})
    ds = build_deepspeed_config(job, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 == job.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    plain = build_deepspeed_config(_job(zero={"stage": 1}), world_size=2)
    assert "offload_optimizer" not in plain["zero_optimization"] and "checkpoint" not in plain


def test_elastic_resize_keeps_the_global_batch():
    # Ray may pick any size in min..max, so every one of them must divide the global batch.
    job = _job(train={"micro_batch_size": 2, "grad_accum_steps": 3}, scaling={"num_workers": 4, "min_workers": 2})
    for world, accum in ((4, 3), (3, 4), (2, 6)):
        ds = build_deepspeed_config(job, world_size=world)
        assert ds["gradient_accumulation_steps"] == accum and ds["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="not divisible"):
        _job(train={"micro_batch_size": 4}, scaling={"num_workers": 4, "min_workers": 3})


def test_launcher_rejects_a_wrong_key_before_starting_anything():
    run = subprocess.run(
        [sys.executable, "-m", "launchers.train", "--stage", "stage1", "--config", str(SMOKE),
         "--set", "data.manifest=/m", "--set", "train.warmup=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "warmup" in run.stderr and "Traceback" not in run.stderr
