"""Completion markers and the fallback past a broken latest checkpoint (fast, no Ray), and the watchdog."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster import checkpoints
from cluster.watchdog import WATCHDOG_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]


def _write_checkpoint(run_dir, step, *, world_size=2, attempt="aa"):
    """What two ranks leave in storage: rank 0's run.json and files, rank 1's files, one marker each."""
    directory = run_dir / checkpoints.checkpoint_dir_name(step, attempt)
    (directory / "deepspeed").mkdir(parents=True)
    (directory / checkpoints.RUN_FILE).write_text(json.dumps({"step": step, "world_size": world_size}))
    for rank in range(world_size):
        # each rank writes into its own local dir; storage holds the union
        part = run_dir / f".rank{rank}-{step}"
        (part / "deepspeed").mkdir(parents=True)
        (part / "deepspeed" / f"zero_pp_rank_{rank}.pt").write_bytes(bytes([rank]) * (100 + step))
        if rank == 0:
            (part / checkpoints.RUN_FILE).write_text((directory / checkpoints.RUN_FILE).read_text())
        checkpoints.seal_rank(part, rank)
        for path in part.rglob("*"):
            if path.is_file():
                target = directory / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return directory


def test_complete_checkpoint_verifies_and_names_its_step(tmp_path):
    directory = _write_checkpoint(tmp_path / "run", 6)
    assert checkpoints.verify_complete(directory)["step"] == 6
    assert checkpoints.step_of(directory.name) == 6


def test_missing_rank_marker_is_incomplete(tmp_path):
    directory = _write_checkpoint(tmp_path / "run", 6)
    (directory / checkpoints.COMPLETE_DIR / "rank_00001.json").unlink()
    with pytest.raises(checkpoints.CheckpointIncomplete, match="rank 1 of 2 never marked"):
        checkpoints.verify_complete(directory)


def test_broken_latest_falls_back_to_the_previous_complete_one(tmp_path):
    _write_checkpoint(tmp_path / "run", 3)
    latest = _write_checkpoint(tmp_path / "run", 6)
    shard = latest / "deepspeed" / "zero_pp_rank_1.pt"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated upload
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        point = checkpoints.find_resume_point(str(tmp_path), "run")
    assert point.info["step"] == 3


def test_no_checkpoint_at_all_is_a_fresh_start_but_only_broken_ones_is_an_error(tmp_path):
    assert checkpoints.find_resume_point(str(tmp_path), "run") is None
    directory = _write_checkpoint(tmp_path / "run", 3)
    (directory / checkpoints.RUN_FILE).unlink()
    with pytest.warns(UserWarning), pytest.raises(checkpoints.CheckpointIncomplete, match="no complete checkpoint"):
        checkpoints.find_resume_point(str(tmp_path), "run")


def test_watchdog_ends_a_hung_step_and_says_why():
    code = textwrap.dedent("""
        import time
        from cluster.watchdog import StepWatchdog
        dog = StepWatchdog(0.5)
        dog.arm("7")
        time.sleep(30)   # a step that never returns
    """)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == WATCHDOG_EXIT_CODE
    assert "step 7 exceeded fault_tolerance.step_timeout_s=0.5s" in run.stderr
    assert time.monotonic() - started < 20


def test_watchdog_leaves_a_step_that_finishes_in_time_alone():
    code = textwrap.dedent("""
        import time
        from cluster.watchdog import StepWatchdog
        with StepWatchdog(0.5) as dog:
            for step in range(5):
                dog.arm(str(step)); time.sleep(0.1); dog.disarm()
            time.sleep(1.0)   # disarmed: idle time between steps does not count
        print("finished")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0 and "finished" in run.stdout


def test_run_reference_resolves_to_the_newest_complete_export(tmp_path):
    _write_checkpoint(tmp_path / "stage1", 3)
    latest = _write_checkpoint(tmp_path / "stage1", 6)
    resolved = checkpoints.resolve_run_reference("run:stage1", str(tmp_path))
    assert Path(resolved) == latest / checkpoints.EXPORT_DIR
    # A plain export path passes through untouched; a run without checkpoints is a clear error.
    assert checkpoints.resolve_run_reference("/exports/base", str(tmp_path)) == "/exports/base"
    with pytest.raises(FileNotFoundError, match="run 'stage9' has no checkpoint"):
        checkpoints.resolve_run_reference("run:stage9", str(tmp_path))
