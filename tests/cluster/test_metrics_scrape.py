"""A real Prometheus scrapes a real 2-worker DeepSpeed run: the per-worker counters add up to the tokens
the run consumed (counted from the data position in its checkpoint, not from any metric), and the MFU
and optimizer-time series are not empty."""
from __future__ import annotations

import json
import time

import pytest

from cluster import run_stage
from cluster.ray_head import free_port
from core import storage
from mmrec.metrics import names
from mmrec.train.checkpoint import list_checkpoints
from tests.support.prometheus import start_prometheus, stop_prometheus

from .conftest import SEQ_LEN, make_config

pytestmark = pytest.mark.slow
STEPS = 24


def test_two_workers_count_their_own_tokens_and_report_mfu_and_optimizer_time(ray_head, manifest, tmp_path):
    base = free_port()
    # Rank 0 binds the first free port from `base`, rank 1 the next one: both are scrape targets.
    server = start_prometheus(tmp_path, targets=[f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], rule_files=[])
    try:
        cfg = make_config(manifest, tmp_path / "runs", run={"name": "scraped", "record_sample_digests": False},
                          train={"max_steps": STEPS, "checkpoint_every": 12, "log_every": 4},
                          metrics={"enabled": True, "port": base, "linger_s": 3.0})
        result = run_stage(cfg)
        run = json.loads(storage.read_text(storage.join(result.run_url, list_checkpoints(result.run_url)[0], "run.json")))
        # Global samples consumed, from the loader position: whole epochs of the dataset plus the offset.
        from mmrec.data import ShardLoader

        epoch_samples = ShardLoader(manifest, ("text", "code"), micro_batch_size=8, world_size=2).epoch_samples()
        consumed = (run["data"]["epoch"] * epoch_samples + run["data"]["global_offset"]) * SEQ_LEN
        assert consumed == STEPS * 16 * SEQ_LEN
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the exporters are gone; Prometheus keeps their last values
            tokens = server.query(f"max_over_time({names.TOKENS}_total[10m])")
            if len(tokens) == 2 and all(float(s["value"][1]) == consumed / 2 for s in tokens):
                break
            time.sleep(1)
        assert sorted(s["metric"]["rank"] for s in tokens) == ["0", "1"]
        assert sum(float(s["value"][1]) for s in tokens) == consumed  # not world_size x too many
        mfu = server.query(f"max_over_time({names.MFU}[10m])")
        assert len(mfu) == 2 and all(0 < float(s["value"][1]) < 1 for s in mfu)
        optimizer = server.query(f'max_over_time({names.STEP_PHASE}_total{{phase="optimizer"}}[10m])')
        assert len(optimizer) == 2 and all(float(s["value"][1]) > 0 for s in optimizer)
    finally:
        stop_prometheus(server)
