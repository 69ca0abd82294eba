"""The config-driven fault hook (JobConfig.fault) and the sample digests of the data-order audit.

Faults a real component cannot produce on demand are injected here, at a given optimizer step, on
one rank: raise, SIGKILL itself, hang, or turn the loss into NaN. Step faults fire on the first
attempt only: the faulting rank writes a marker into the run storage before firing, and a restarted
attempt that finds it passes the step. This is test and drill machinery; real training never
enables it.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time

import torch

from cluster import storage
from cluster.config import JobConfig


class InjectedFault(RuntimeError):
    """Raised by the fault hook (config `fault.fail_at_step`); never by real training."""


def inject_step_faults(job: JobConfig, *, rank: int, fault_rank: int, step: int, attempt_id: str) -> None:
    fault = job.fault
    if rank != fault_rank or not fault.any_step_fault:
        return
    for kind, at in (("fail", fault.fail_at_step), ("kill", fault.kill_at_step), ("hang", fault.hang_at_step)):
        if at != step:
            continue
        fs, root = storage.filesystem_for(job.run.storage_path)
        marker = storage.join(root, job.run_name, "injected_faults", f"{kind}-step{step}")
        if storage.exists(fs, marker):
            continue  # fired on an earlier attempt
        storage.write_text(fs, marker, f"rank {rank} attempt {attempt_id}\n")
        print(f"[{job.stage}] fault hook: injecting '{kind}' on rank {rank} at step {step}", flush=True)
        if kind == "fail":
            raise InjectedFault(f"fault.fail_at_step={step}: injected failure on rank {rank}")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10**9)  # hang: only the step watchdog ends this


def hash_sample(row: torch.Tensor) -> int:
    """A stable 63-bit digest of one sample's tokens."""
    digest = hashlib.blake2b(row.numpy().astype("int64").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
