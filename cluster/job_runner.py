"""Ray jobs of `python -m launchers.X` entrypoints: submitted, followed, explained, stopped.

A job's progress lines are echoed as they come (the stage's step lines carry an ETA); a job that
fails has its reason echoed (the launcher's `error:` line or the last traceback line, and Ray's own
message), not only a pointer to its log; a job that Ray cannot start within the schedule timeout is
stopped with a message saying what it waited for; stop_all() stops every job still running (the
pipeline calls it on SIGINT/SIGTERM), and Ray ends each job's whole process group.
"""
from __future__ import annotations

import logging
import re
import shlex
import sys
import time
from pathlib import Path

from core import storage

REPO_ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WORKER_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\) ")
log = logging.getLogger("cluster.pipeline")


class JobFailed(RuntimeError):
    """A submitted job ended FAILED or STOPPED; the message carries its reason."""


def failure_reason(text: str, message: str) -> str:
    """The lines of a job log that say why it failed: launcher errors, else the last exception line."""
    lines = [_WORKER_PREFIX.sub("", _ANSI.sub("", line)).strip() for line in text.splitlines()]
    said = [line for line in lines if re.search(r"(^|: )error: ", line)]
    if not said:
        said = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Failed)\b.*:", line)][-1:]
    reason = " | ".join(dict.fromkeys(said))  # in order, without repeats
    message = (message or "").strip().splitlines()[-1] if message and message.strip() else ""
    return "; ".join(part for part in (reason, message) if part) or "no reason in its log"


class JobRunner:
    """Submits launchers as Ray jobs; `ship_code` uploads the repository as the job's working_dir
    (a remote cluster), otherwise the local head reads the code in place through PYTHONPATH."""

    def __init__(self, dashboard: str, logs_url: str, *, ship_code: bool, schedule_timeout_s: float,
                 retries: int = 2) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client, self.logs_url, self.ship_code = JobSubmissionClient(dashboard), logs_url, ship_code
        self.schedule_timeout_s, self.retries = schedule_timeout_s, retries
        self.specs: dict[str, tuple[str, list[str]]] = {}
        self.running: dict[str, str] = {}  # name -> job id of every job not yet finished

    def submit(self, name: str, module: str, args: list[str]) -> str:
        self.specs[name] = (module, args)
        env_vars = {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **storage.forwarded_env()}
        command = shlex.join([sys.executable if not self.ship_code else "python", "-m", module, *args])
        if self.ship_code:
            runtime_env = {"working_dir": str(REPO_ROOT),
                           "excludes": [".git", ".venv", "runs", ".cache", "**/__pycache__"]}
            entrypoint = command
        else:
            # One shared working_dir package can vanish between two jobs (RuntimeEnvSetupError): the
            # local head reads the code where it is instead.
            env_vars["PYTHONPATH"] = str(REPO_ROOT)
            runtime_env = {}
            entrypoint = f"cd {shlex.quote(str(REPO_ROOT))} && {command}"
        for attempt in range(30):
            try:
                job_id = self.client.submit_job(entrypoint=entrypoint, runtime_env={**runtime_env, "env_vars": env_vars},
                                                submission_id=f"{name}-{time.time_ns()}")
                break
            except RuntimeError as error:
                # The dashboard answers before its job agent has registered (a head that just started,
                # or a busy one): Ray asks to try again later.
                if "No available agent" not in str(error) or attempt == 29:
                    raise
                time.sleep(2)
        self.running[name] = job_id
        log.info("[pipeline] submitted %s as Ray job %s", name, job_id)
        return job_id

    def wait(self, names: list[str], *, echo: tuple[str, ...] = ("[stage",)) -> None:
        """Wait for the named jobs, echoing their progress lines; JobFailed if any did not succeed."""
        from ray.job_submission import JobStatus

        printed = {name: 0 for name in names}
        last_echo = {name: "" for name in names}
        retries = {name: self.retries for name in names}
        submitted = {name: time.monotonic() for name in names}
        pending = list(names)
        while pending:
            time.sleep(2)
            for name in list(pending):
                job_id = self.running[name]
                status = self.client.get_job_status(job_id)  # before the logs, so a finished job's logs are complete
                if status == JobStatus.PENDING and time.monotonic() - submitted[name] > self.schedule_timeout_s:
                    self.client.stop_job(job_id)
                    raise JobFailed(
                        f"Ray job {name} could not start within ray.schedule_timeout_s={self.schedule_timeout_s:g}s "
                        f"(it waits for a CPU for its driver; the cluster is busy or has none): "
                        f"{self.client.get_job_info(job_id).message or 'no message from Ray'}")
                text = self.client.get_job_logs(job_id)
                lines = text.splitlines()
                for line in lines[printed[name]:]:
                    line = _WORKER_PREFIX.sub("", _ANSI.sub("", line))
                    if (any(mark in line for mark in echo) or "error" in line.lower()) and line != last_echo[name]:
                        log.info("  %s | %s", name, line)
                        last_echo[name] = line
                printed[name] = len(lines)
                if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    continue
                storage.write_text(storage.join(self.logs_url, f"{name}.log"), text)
                pending.remove(name)
                del self.running[name]
                if status == JobStatus.SUCCEEDED:
                    continue
                message = self.client.get_job_info(job_id).message or ""
                if "RuntimeEnvSetupError" in text + message and retries[name] > 0:
                    retries[name] -= 1
                    log.info("[pipeline] %s: Ray could not set up the job's runtime environment; submitting it again", name)
                    self.submit(name, *self.specs[name])
                    pending.append(name)
                    printed[name], last_echo[name], submitted[name] = 0, "", time.monotonic()
                    continue
                raise JobFailed(f"Ray job {name} ended {status}: {failure_reason(text, message)} "
                                f"(full log: {storage.join(self.logs_url, name + '.log')})")

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """Stop every job still running and wait for them to end (Ray ends each job's process group)."""
        from ray.job_submission import JobStatus

        for name, job_id in list(self.running.items()):
            try:
                self.client.stop_job(job_id)
                log.info("[pipeline] stopping %s (Ray job %s)", name, job_id)
            except Exception as error:  # noqa: BLE001 - a job that already ended cannot be stopped
                log.warning("[pipeline] could not stop %s: %s", name, error)
        deadline = time.monotonic() + timeout_s
        for name, job_id in list(self.running.items()):
            while time.monotonic() < deadline:
                try:
                    if self.client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                        break
                except Exception:  # noqa: BLE001 - the dashboard may be going down with the head
                    break
                time.sleep(0.5)
            self.running.pop(name, None)
