"""A local Ray head for one pipeline run or one test session, stopped by its PID.

`ray start --head --block` runs as a child in its own process group with its own temp dir (so it
never writes the machine-wide session file that a later bare ray.init() would follow), on free
loopback ports. It dies with its parent: the child asks the kernel for SIGTERM when the parent
exits (PR_SET_PDEATHSIG), so even a SIGKILLed pipeline leaves no cluster behind.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for servers this machine starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the context manager still stops it on every normal exit


class LocalRayHead:
    """`ray start --head --block` as a child process; stopped by its process group on exit."""

    def __init__(self, num_cpus: int, log_path: Path, *, env: dict[str, str] | None = None,
                 start_timeout_s: float = 180.0) -> None:
        self.num_cpus, self.log_path, self.extra_env = num_cpus, Path(log_path), env or {}
        self.start_timeout_s = start_timeout_s
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None
        self._log = None
        # Short: Ray puts unix sockets under it, and socket paths are limited to about 100 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def __enter__(self) -> LocalRayHead:
        ray_bin = Path(sys.executable).with_name("ray")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        # No drain on SIGTERM (Ray's default waits up to 30 s for the node to go idle, for Serve replicas
        # on Kubernetes): this head is thrown away with the run, and a drain only delays its stop.
        self.env = {**os.environ, **self.extra_env, "RAY_AUTH_MODE": "disabled",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={self.gcs.rsplit(':', 1)[1]}",
             f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_until_up(ray_bin)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_up(self, ray_bin: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while subprocess.run([str(ray_bin), "status", f"--address={self.gcs}"], capture_output=True,
                             env=self.env).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Ray head did not start within {self.start_timeout_s:g}s; "
                                   f"see {self.log_path}")
            time.sleep(1)
        from ray.job_submission import JobSubmissionClient

        while True:  # the dashboard's job API comes up a little after the GCS
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local Ray head's job API at {self.dashboard} did not answer; "
                                       f"see {self.log_path}") from None
                time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGTERM to `ray start` alone, which stops the GCS, raylet and the rest itself in seconds.
            # (SIGTERM to the whole group killed the GCS first, and Ray's drain then waited 30 s for it:
            # ~60 s per head.) Bounded: the head holds nothing worth a longer wait; the group is
            # SIGKILLed below.
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            try:  # whatever the head started in its group and left behind
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
