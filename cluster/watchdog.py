"""A hang watchdog: a training step that runs past its timeout ends the process.

A rank stuck in a collective (a peer died mid all-reduce, a wedged device) never returns to Python,
so no exception can be raised in it. A daemon thread watches the step instead and, on timeout, exits
the process with WATCHDOG_EXIT_CODE; Ray Train sees a dead worker and restarts the attempt from the
last checkpoint (FailureConfig), which is the only recovery that works for every kind of hang.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

WATCHDOG_EXIT_CODE = 75


def _exit_process(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(WATCHDOG_EXIT_CODE)


class StepWatchdog:
    def __init__(self, timeout_s: float, *, what: str = "training step", on_timeout: Callable[[str], None] = _exit_process):
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.what, self.on_timeout = timeout_s, what, on_timeout
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._label = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def arm(self, label: str) -> None:
        with self._lock:
            self._deadline, self._label = time.monotonic() + self.timeout_s, label

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                label = self._label
                if expired:
                    self._deadline = None
            if expired:
                self.on_timeout(
                    f"watchdog: {self.what} {label} exceeded fault_tolerance.step_timeout_s={self.timeout_s:g}s; "
                    "ending this worker so Ray Train restarts the attempt from the last checkpoint"
                )

    def __enter__(self) -> StepWatchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
