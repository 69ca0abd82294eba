"""The config-driven fault hook ([fault]) and the sample digests of the data-order audit.

Faults a real component cannot produce on demand are injected here, at a given optimizer step, on
one rank: raise, SIGKILL itself, hang, or turn the loss into NaN. Step faults fire on the first
attempt only: the faulting rank writes a marker into the run directory before firing, and a
restarted attempt that finds it passes the step. This is test and drill machinery (both engines
have it, so every recovery path is tested in both); real training never enables it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from collections import Counter

import torch

from core import storage
from core.config import FaultInjection

log = logging.getLogger(__name__)
MARKERS_DIR = "injected_faults"


class InjectedFault(RuntimeError):
    """Raised by the fault hook (fault.fail_at_step); never by real training."""


class FaultHook:
    def __init__(self, fault: FaultInjection, *, run_url: str, rank: int, world_size: int) -> None:
        self.fault, self.run_url, self.rank = fault, run_url, rank
        self.fault_rank = fault.fault_rank if fault.fault_rank >= 0 else world_size - 1
        self.nan_fired: Counter[int] = Counter()

    def before_step(self, step: int) -> None:
        """Raise, die or hang here when [fault] says so for this step and rank (first attempt only)."""
        if self.rank != self.fault_rank or not self.fault.any_step_fault:
            return
        for kind, at in (("fail", self.fault.fail_at_step), ("kill", self.fault.kill_at_step),
                         ("hang", self.fault.hang_at_step)):
            if at != step:
                continue
            marker = storage.join(self.run_url, MARKERS_DIR, f"{kind}-step{step}")
            if storage.exists(marker):
                continue  # fired on an earlier attempt
            storage.write_text(marker, f"rank {self.rank}\n")
            log.warning("fault hook: injecting %r on rank %d at step %d", kind, self.rank, step)
            if kind == "fail":
                raise InjectedFault(f"fault.fail_at_step={step}: injected failure on rank {self.rank}")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10**9)  # hang: only the step watchdog ends this

    def poison_loss(self, step: int) -> bool:
        """True when this step's loss must become NaN on this rank (fault.nan_at_steps, nan_times each)."""
        if self.rank != self.fault_rank or step not in self.fault.nan_at_steps:
            return False
        if self.nan_fired[step] >= self.fault.nan_times:
            return False
        self.nan_fired[step] += 1
        log.warning("fault hook: NaN loss on rank %d at step %d", self.rank, step)
        return True


def hash_sample(row: torch.Tensor) -> int:
    """A stable 63-bit digest of one sample's tokens."""
    digest = hashlib.blake2b(row.numpy().astype("int64").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
