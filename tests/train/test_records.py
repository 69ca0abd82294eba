"""The run's records: metrics.jsonl lines match what the loop computed, loss.png is a real PNG drawn from
them, and TensorBoard event files (when asked for) read back with the same values."""
from __future__ import annotations

import math

import pytest

from mmrec.train import Trainer
from mmrec.train.records import loss_curves, read_records

from .conftest import make_config


def test_metrics_file_plot_and_tensorboard_events(manifest, tmp_path):
    result = Trainer(make_config(manifest, tmp_path, run={"tensorboard": True})).fit()
    records = read_records(result.run_url)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]
    assert [r["tokens"] for r in train] == [2 * 16 * s for s in range(1, 9)]  # batch 2 x 16 tokens per step
    for record in train:
        assert math.isfinite(record["loss"]) and record["lr"] > 0 and record["grad_norm"] > 0
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
        assert record["data_wait_seconds"] + record["forward_backward_seconds"] + record["optimizer_seconds"] \
            <= record["step_seconds"] + 1e-9
    assert evals[-1]["val_loss"] == pytest.approx(result.last_eval.loss)

    png = tmp_path / "stage1" / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 0.05  # not a blank sheet
    curves = loss_curves(records)
    assert curves["train"][1] == [r["loss"] for r in train] and curves["val"][1] == [r["val_loss"] for r in evals]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "stage1" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in events.Scalars("val/val_loss")] == pytest.approx([r["val_loss"] for r in evals], rel=1e-6)
