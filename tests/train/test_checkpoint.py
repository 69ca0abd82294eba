"""The checkpoint layout: completion markers, fallback past broken checkpoints, an atomic publish that a
real SIGKILL cannot tear, export pointers and run:<name> references, RNG state."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mmrec.train import checkpoint as ckpt


def _write_checkpoint(directory, step, world_size=2, payload=b"x" * 1000):
    directory.mkdir(parents=True)
    for rank in range(world_size):
        (directory / "engine").mkdir(exist_ok=True)
        (directory / "engine" / f"part_{rank}.bin").write_bytes(payload + bytes([rank]))
        if rank == 0:
            (directory / ckpt.RUN_FILE).write_text(json.dumps({"step": step, "world_size": world_size}))
        ckpt.seal_rank(directory, rank)
    return directory


def test_complete_only_when_every_rank_sealed_matching_files(tmp_path):
    good = _write_checkpoint(tmp_path / ckpt.checkpoint_name(3, "aa"), 3)
    assert ckpt.verify_complete(good)["step"] == 3
    (good / "complete" / "rank_00001.json").unlink()
    with pytest.raises(ckpt.CheckpointIncomplete, match="rank 1 of 2 never marked its part complete"):
        ckpt.verify_complete(good)
    bad = _write_checkpoint(tmp_path / ckpt.checkpoint_name(4, "aa"), 4)
    part = bad / "engine" / "part_1.bin"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointIncomplete, match="part_1.bin .written by rank 1. is truncated or corrupt"):
        ckpt.verify_complete(bad)


def test_resume_point_falls_back_past_broken_checkpoints_and_refuses_when_none_is_whole(tmp_path):
    assert ckpt.find_resume_point(str(tmp_path)) is None
    for step in (1, 2, 3):
        _write_checkpoint(tmp_path / ckpt.checkpoint_name(step, "ab"), step)
    (tmp_path / ckpt.checkpoint_name(3, "ab") / ckpt.RUN_FILE).write_text("{ torn")
    with pytest.warns(UserWarning, match="falling back to an older one"):
        point = ckpt.find_resume_point(str(tmp_path))
    assert point.info["step"] == 2 and point.source.endswith(ckpt.checkpoint_name(2, "ab"))
    for step in (1, 2):
        (tmp_path / ckpt.checkpoint_name(step, "ab") / ckpt.RUN_FILE).unlink()
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointIncomplete, match="no complete checkpoint"):
        ckpt.find_resume_point(str(tmp_path))


# The crash is a real SIGKILL of a real process; only *when* it happens is forced, by wrapping os.replace,
# because no real component can kill a writer at an exact point of the protocol on demand.
_KILL_DURING_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys, json
    from pathlib import Path
    from mmrec.train import checkpoint as ckpt
    run, local = sys.argv[1], Path(sys.argv[2])
    local.mkdir()
    (local / "run.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (local / "weights.bin").write_bytes(os.urandom(1 << 20))
    ckpt.seal_rank(local, 0)
    real_replace = os.replace
    def replace(src, dst):
        if "step_00000002" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    ckpt.publish_checkpoint(local, run, "step_00000002-cd", keep=3)
    """
)


def test_a_killed_publish_leaves_the_previous_checkpoint_the_one_resumed(tmp_path):
    run = tmp_path / "run"
    _write_checkpoint(run / "step_00000001-cd", 1, world_size=1)
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_PUBLISH, str(run), str(tmp_path / "local")],
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert ckpt.list_checkpoints(str(run)) == ["step_00000001-cd"]  # the half-copied one is not a checkpoint
    assert ckpt.find_resume_point(str(run)).info["step"] == 1


def test_publish_keeps_the_newest_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in range(1, 6):
        local = _write_checkpoint(tmp_path / f"local{step}", step, world_size=1)
        ckpt.publish_checkpoint(local, str(run), ckpt.checkpoint_name(step, "ef"), keep=2)
    assert ckpt.list_checkpoints(str(run)) == ["step_00000005-ef", "step_00000004-ef"]


def test_export_pointers_resolve_run_references(tmp_path):
    run = str(tmp_path / "stage1")
    with pytest.raises(FileNotFoundError, match="run 'stage1' has no export"):
        ckpt.resolve_export("run:stage1", str(tmp_path))
    for step in (2, 4):
        (tmp_path / "stage1" / "exports" / ckpt.export_name(step)).mkdir(parents=True)
    ckpt.write_pointer(run, "latest", ckpt.export_name(4))
    assert ckpt.resolve_export("run:stage1", str(tmp_path)).endswith("exports/step_00000004")  # no best: latest
    ckpt.write_pointer(run, "best", ckpt.export_name(2))
    assert ckpt.resolve_export("run:stage1", str(tmp_path)).endswith("exports/step_00000002")
    assert ckpt.resolve_export("run:stage1@latest", str(tmp_path)).endswith("exports/step_00000004")
    assert ckpt.resolve_export("/some/dir", str(tmp_path)) == "/some/dir"
    with pytest.raises(ValueError, match="must be best or latest"):
        ckpt.resolve_export("run:stage1@worst", str(tmp_path))


def test_rng_state_round_trips():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
