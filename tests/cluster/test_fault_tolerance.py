"""Failure injection on real Ray Train + DeepSpeed runs: restarts, NaN rollbacks, elastic resize.

The faults come from the config-driven fault hook (cluster.config.FaultInjection): a worker that
raises, kills itself or produces a NaN loss at a given step. That hook is the one sanctioned stand-in
for faults a real component cannot produce on demand; everything else (Ray, DeepSpeed, gloo, the
checkpoint storage) is real.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import checkpoints, run_stage

from .conftest import make_job  # noqa: E402  (importlib mode resolves the package-relative import)

pytestmark = pytest.mark.slow


def _run_info(result) -> dict:
    return json.loads((Path(result.checkpoint) / checkpoints.RUN_FILE).read_text())


@pytest.fixture(scope="module")
def clean_run(ray_head, manifest, tmp_path_factory):
    """The uninterrupted reference run (2 workers, ZeRO-2, fp32)."""
    return run_stage(make_job(manifest, tmp_path_factory.mktemp("clean"), run={"name": "clean"}))


def _assert_same_run(history, reference, *, atol):
    assert [h["step"] for h in history] == list(range(1, 9))
    for got, want in zip(history, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=atol), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["samples"] == want["samples"], f"step {got['step']} consumed other samples"
    consumed = [d for h in history for d in h["samples"]]
    assert len(consumed) == len(set(consumed)) == 8 * 16, "every sample exactly once"


def test_worker_raising_restarts_and_continues_exactly(clean_run, manifest, tmp_path):
    storage = tmp_path / "runs"
    result = run_stage(make_job(manifest, storage, run={"name": "raise"}, fault={"fail_at_step": 5}))
    assert (storage / "raise" / "injected_faults" / "fail-step5").is_file()  # the fault really fired
    _assert_same_run(result.history(), clean_run.history(), atol=1e-6)


def test_worker_killed_restarts_and_continues_exactly_zero1(manifest, ray_head, tmp_path):
    clean = run_stage(make_job(manifest, tmp_path / "a", zero={"stage": 1}, run={"name": "z1"}))
    killed = run_stage(make_job(manifest, tmp_path / "b", zero={"stage": 1}, run={"name": "z1"}, fault={"kill_at_step": 4}))
    assert (tmp_path / "b" / "z1" / "injected_faults" / "kill-step4").is_file()
    _assert_same_run(killed.history(), clean.history(), atol=1e-6)


def test_resume_from_two_workers_to_one_keeps_data_order(clean_run, manifest, tmp_path):
    # Elastic range 1..2 workers with global batch fixed at 16. The first attempt runs 2 workers; at
    # step 5 one of them hangs and the step watchdog ends it (max_failures=0, so the run stops after the
    # step-3 checkpoint). The same run is then resumed with workers that need 2 CPUs each, so only one
    # fits on the 2-CPU head: a ZeRO-2 checkpoint of world size 2 resumed by world size 1 (through a
    # universal checkpoint).
    storage = tmp_path / "runs"
    common = dict(run={"name": "elastic"}, scaling={"num_workers": 2, "min_workers": 1})
    with pytest.raises(Exception):
        run_stage(make_job(manifest, storage, **common, fault={"hang_at_step": 5},
                           fault_tolerance={"max_failures": 0, "step_timeout_s": 20.0}))
    assert (storage / "elastic" / "injected_faults" / "hang-step5").is_file()
    resumed = run_stage(make_job(manifest, storage, run={"name": "elastic"},
                                 scaling={"num_workers": 2, "min_workers": 1, "cpus_per_worker": 2.0}))
    info = _run_info(resumed)
    assert info["world_size"] == 1
    # Different reduction order across 1 vs 2 ranks: equal up to float rounding, same data exactly.
    _assert_same_run(resumed.history(), clean_run.history(), atol=2e-5)


def test_nan_loss_rolls_back_with_lower_lr(clean_run, manifest, tmp_path):
    result = run_stage(make_job(manifest, tmp_path, run={"name": "nan"}, fault={"nan_at_steps": (5,), "nan_times": 1}))
    info = _run_info(result)
    assert info["nan_rollbacks"] == 1 and info["lr_scale"] == 0.5
    history, reference = result.history(), clean_run.history()
    # Steps 1-3 come from before the step-3 checkpoint; steps 4.. were re-run at half the lr.
    assert [h["loss"] for h in history[:3]] == pytest.approx([h["loss"] for h in reference[:3]], abs=1e-6)
    for got, want in zip(history[3:], reference[3:]):
        assert got["lr"] == pytest.approx(0.5 * want["lr"], rel=1e-9)
        assert got["samples"] == want["samples"]


def test_repeated_nan_fails_with_a_clear_message(manifest, ray_head, tmp_path):
    job = make_job(manifest, tmp_path, run={"name": "nan-forever"}, fault={"nan_at_steps": (2,), "nan_times": 100},
                   fault_tolerance={"max_failures": 0, "nan_max_rollbacks": 2, "step_timeout_s": 120.0})
    with pytest.raises(Exception, match=r"non-finite loss at step 2 after 2 rollbacks"):
        run_stage(job)
