"""The step watchdog (a real hung process), the DeepSpeed config derived from ours, elastic batch
geometry, and the launcher refusing a wrong key before anything starts (fast, no Ray)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from cluster.watchdog import WATCHDOG_EXIT_CODE
from core.config import ConfigError, resolve
from mmrec.train.deepspeed_engine import deepspeed_config

from .conftest import REPO

SMOKE = REPO / "configs" / "smoke.toml"


def test_watchdog_ends_a_hung_step_and_says_why():
    code = textwrap.dedent("""
        import time
        from cluster.watchdog import StepWatchdog
        dog = StepWatchdog(0.5)
        dog.arm("7")
        time.sleep(30)   # a step that never returns
    """)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == WATCHDOG_EXIT_CODE
    assert "step 7 exceeded fault_tolerance.step_timeout_s=0.5s" in run.stderr
    assert time.monotonic() - started < 20


def test_watchdog_leaves_a_step_that_finishes_in_time_alone():
    code = textwrap.dedent("""
        import time
        from cluster.watchdog import StepWatchdog
        with StepWatchdog(0.5) as dog:
            for step in range(5):
                dog.arm(str(step)); time.sleep(0.1); dog.disarm()
            time.sleep(1.0)   # disarmed: idle time between steps does not count
        print("finished")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0 and "finished" in run.stdout


def _deepspeed(**sections):
    return resolve({"engine": {"kind": "deepspeed"}, **sections}, stage="stage1")


def test_deepspeed_config_follows_ours():
    cfg = _deepspeed(train={"micro_batch_size": 4, "grad_accum_steps": 3, "grad_clip": 0.5},
                     engine={"kind": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_param": True},
                     scaling={"num_workers": 2})
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 == cfg.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["fp16"] == {"enabled": False}
    assert ds["bf16"] == {"enabled": False}  # precision is autocast around the forward, as in the torch engine
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    plain = deepspeed_config(_deepspeed(engine={"kind": "deepspeed", "zero_stage": 1}), world_size=1)
    assert "offload_optimizer" not in plain["zero_optimization"] and "checkpoint" not in plain


def test_elastic_resize_keeps_the_global_batch():
    # Ray may pick any size in min..max, so every one of them must divide the global batch.
    cfg = _deepspeed(train={"micro_batch_size": 2, "grad_accum_steps": 3}, scaling={"num_workers": 4, "min_workers": 2})
    for world, accum in ((4, 3), (3, 4), (2, 6)):
        ds = deepspeed_config(cfg, world_size=world)
        assert ds["gradient_accumulation_steps"] == accum and ds["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="not divisible"):
        _deepspeed(train={"micro_batch_size": 4}, scaling={"num_workers": 4, "min_workers": 3})


def test_launcher_rejects_a_wrong_key_before_starting_anything():
    run = subprocess.run(
        [sys.executable, "-m", "launchers.train", "--stage", "stage1", "--config", str(SMOKE),
         "--set", "data.manifest=/m", "--set", "train.warmup=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "unknown key 'warmup' in [train]" in run.stderr and "Traceback" not in run.stderr
