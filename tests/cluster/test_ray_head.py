"""cluster.ray_head.LocalRayHead stops quickly and completely: every pipeline and most cluster tests
start one, and a slow stop is paid each time."""
from __future__ import annotations

import sys
import time

import psutil
import pytest

from cluster.ray_head import LocalRayHead

pytestmark = pytest.mark.slow


def test_a_head_stops_within_seconds_and_leaves_no_process(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    with LocalRayHead(1, tmp_path / "head.log") as head:
        # A job that ran leaves workers behind: what made Ray's drain wait out its 30 s.
        client = JobSubmissionClient(head.dashboard)
        job = client.submit_job(entrypoint=f"{sys.executable} -c 'import ray; ray.init(); print(ray.get(ray.put(7)))'")
        deadline = time.monotonic() + 120
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED) and time.monotonic() < deadline:
            time.sleep(1)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-2000:]
        spawned = psutil.Process(head.pid).children(recursive=True)
        assert len(spawned) >= 2  # the GCS and the raylet at least
        started = time.monotonic()
    stopped_in = time.monotonic() - started
    # It once took ~60 s: SIGTERM to the whole group killed the GCS, and Ray's drain on SIGTERM waited
    # 30 s for it; after a job, the drain waited its 30 s for the node to go idle. Now: no drain,
    # SIGTERM to `ray start` alone, and the group SIGKILLed after 20 s whatever happens.
    assert stopped_in < 30, f"the head took {stopped_in:.0f}s to stop; see {tmp_path / 'head.log'}"
    assert head.process.poll() is not None  # `ray start` itself exited and was reaped
    _, alive = psutil.wait_procs(spawned, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.name()) for p in alive]
