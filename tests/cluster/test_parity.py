"""The two engines are one system: on the same data and seed, a single process (torch engine) and a
one-worker DeepSpeed ZeRO-0 run produce the same losses, and ZeRO-2 over two workers matches a single
process at the same global batch (real Ray, real DeepSpeed, real gloo)."""
from __future__ import annotations

import pytest

from cluster import run_stage
from mmrec.train import Trainer
from mmrec.train.records import read_records

from .conftest import make_config

pytestmark = pytest.mark.slow


def losses(run_url):
    return [(r["step"], r["loss"], r["lr"]) for r in read_records(run_url) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single_process(manifest, tmp_path_factory):
    """8 steps of global batch 16 in this process (micro 8 x accum 2 = what 2 workers x micro 8 do)."""
    cfg = make_config(manifest, tmp_path_factory.mktemp("single"), run={"name": "single"},
                      engine={"kind": "torch", "zero_stage": 0}, scaling={"num_workers": 1},
                      train={"grad_accum_steps": 2})
    return Trainer(cfg).fit()


def test_one_deepspeed_worker_at_zero0_equals_the_single_process(single_process, manifest, ray_head, tmp_path):
    cfg = make_config(manifest, tmp_path, run={"name": "ds0"}, engine={"zero_stage": 0},
                      scaling={"num_workers": 1}, train={"grad_accum_steps": 2})
    result = run_stage(cfg)
    got, want = losses(result.run_url), losses(single_process.run_url)
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, 9))
    for (step, a, lr_a), (_, b, lr_b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6), step
        assert lr_a == pytest.approx(lr_b, rel=1e-12)


def test_zero2_on_two_workers_matches_the_single_process_at_the_same_global_batch(single_process, manifest,
                                                                                   ray_head, tmp_path):
    result = run_stage(make_config(manifest, tmp_path, run={"name": "ds2"}))  # 2 workers x micro 8, ZeRO-2
    got, want = losses(result.run_url), losses(single_process.run_url)
    # The same samples per step; only the reduction order of the gradients differs (sums over 2 ranks).
    for (step, a, _), (_, b, _) in zip(got, want):
        assert a == pytest.approx(b, abs=2e-5), step
