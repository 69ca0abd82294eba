"""The run's own records, written by rank 0: metrics.jsonl, loss.png and (optionally) TensorBoard events.

metrics.jsonl holds one JSON object per line: {"kind": "train", ...} for every logged step (step,
tokens, loss, lr, grad_norm, tokens_per_s, mfu, step and phase seconds) and {"kind": "eval", ...}
for every validation (val_loss, val_perplexity, val_accuracy). The file is written locally and
copied into the run directory (local or S3) at every checkpoint and at the end; a resumed run keeps
the lines up to the step it resumed from, so the file reads as one run without duplicates.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from core import storage

METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR = "metrics.jsonl", "loss.png", "tensorboard"
log = logging.getLogger(__name__)


def read_records(url: str) -> list[dict[str, Any]]:
    """The records of a run directory's metrics.jsonl ([] when there is none yet)."""
    try:
        text = storage.read_text(storage.join(url, METRICS_FILE))
    except storage.StorageNotFound:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class RunRecords:
    def __init__(self, run_url: str, scratch: Path, *, resume_step: int | None, tensorboard: bool, plots: bool,
                 title: str) -> None:
        self.run_url, self.plots, self.title = run_url, plots, title
        self.local = scratch / METRICS_FILE
        kept = [r for r in read_records(run_url) if resume_step is not None and r["step"] <= resume_step]
        self.local.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(self.local, "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb_dir = scratch / TENSORBOARD_DIR
            self._writer = SummaryWriter(str(self._tb_dir))

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            prefix = "train" if record["kind"] == "train" else "val"
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self._writer.flush()

    def truncate(self, step: int) -> None:
        """Drop the records after `step` (a rollback trains those steps again)."""
        self._handle.close()
        kept = [line for line in self.local.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.local.write_text("".join(line + "\n" for line in kept))
        self._handle = open(self.local, "a")

    def sync(self) -> None:
        """Copy the records (and the refreshed plot) into the run directory."""
        self._handle.flush()
        storage.write_bytes(storage.join(self.run_url, METRICS_FILE), self.local.read_bytes())
        if self.plots:
            plot = self.local.with_name(PLOT_FILE)
            if plot_losses([json.loads(line) for line in self.local.read_text().splitlines() if line], plot, self.title):
                storage.write_bytes(storage.join(self.run_url, PLOT_FILE), plot.read_bytes())
        if self._writer is not None:
            for path in self._tb_dir.rglob("*"):
                if path.is_file():
                    storage.write_bytes(storage.join(self.run_url, TENSORBOARD_DIR, path.relative_to(self._tb_dir).as_posix()),
                                        path.read_bytes())

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()


def loss_curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{"train": (tokens, loss), "val": (tokens, val_loss)}: what loss.png draws."""
    curves: dict[str, tuple[list[float], list[float]]] = {"train": ([], []), "val": ([], [])}
    for record in records:
        if record["kind"] == "train":
            curves["train"][0].append(record["tokens"])
            curves["train"][1].append(record["loss"])
        elif record["kind"] == "eval":
            curves["val"][0].append(record["tokens"])
            curves["val"][1].append(record["val_loss"])
    return curves


def plot_losses(records: list[dict[str, Any]], path: Path, title: str, ax=None) -> bool:
    """Training and validation loss against tokens into `path` (or onto `ax`); False if there is nothing to draw."""
    curves = loss_curves(records)
    if not curves["train"][0] and not curves["val"][0]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        figure, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*curves["train"], label="train", linewidth=1)
    if curves["val"][0]:
        ax.plot(*curves["val"], "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if own:
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
    return True
