"""Checkpoint atomicity, corruption fallback, weights_only loading and pruning."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mmrec.train import CheckpointError, Trainer, load_checkpoint, load_latest, prepare_stage, save_checkpoint

# The crash is a real SIGKILL of a real process; only *when* it happens is forced, by wrapping os.replace,
# because no real component can kill a writer at an exact point of the protocol on demand.
_KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from mmrec.train.checkpoint import save_checkpoint
    directory, kill_when = sys.argv[1], sys.argv[2]
    save_checkpoint(directory, 1, {"w": torch.ones(3)})
    real_replace = os.replace
    def replace(src, dst):
        if (kill_when == "publish" and ".step_00000002.tmp" in str(src)) or (
            kill_when == "pointer" and str(dst).endswith("latest") and os.path.isdir(os.path.join(directory, "step_00000002"))
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    save_checkpoint(directory, 2, {"w": torch.zeros(3)})
    """
)


@pytest.mark.parametrize("kill_when", ["publish", "pointer"])
def test_killed_save_leaves_previous_checkpoint_usable(tmp_path, kill_when):
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path), kill_when], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    path, state = load_latest(tmp_path)
    assert path.name == "step_00000001" and torch.equal(state["w"], torch.ones(3))
    save_checkpoint(tmp_path, 3, {"w": torch.full((3,), 3.0)})  # the next save cleans up and proceeds
    assert not list(tmp_path.glob(".step_*"))
    assert torch.equal(load_latest(tmp_path)[1]["w"], torch.full((3,), 3.0))


def test_truncated_or_corrupt_latest_falls_back_with_warning(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))})
    state_file = tmp_path / "step_00000003" / "state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "step_00000003")
    with pytest.warns(UserWarning, match="falling back to an older one"):
        path, state = load_latest(tmp_path)
    assert path.name == "step_00000002" and state["w"][0] == 2.0
    # Same size, one flipped byte: caught by the hash, not by unpickling.
    state_file = tmp_path / "step_00000002" / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[-100] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "step_00000002")
    with pytest.warns(UserWarning):
        assert load_latest(tmp_path)[0].name == "step_00000001"
    (tmp_path / "step_00000001" / "meta.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_trainer_checkpoint_is_plain_data_and_pruned(model_cfg, train_cfg, streams, tmp_path):
    cfg = train_cfg.replace(checkpoint_every=2, keep_checkpoints=2, max_steps=6, eval_every=0)
    setup = prepare_stage("stage1", model_cfg, cfg)
    train, _ = streams()
    Trainer(setup, cfg, train, out_dir=tmp_path, log=lambda _: None).fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]
    state = torch.load(tmp_path / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["data"] == train.state_dict()
    assert state["train_config"] == cfg.to_dict() and state["model_config"] == model_cfg.to_dict()
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    assert state["scheduler"]["last_epoch"] == 6 and len(state["optimizer"]["state"]) > 0
    model_state = setup.model.state_dict()
    assert all(torch.equal(state["model"][k], model_state[k]) for k in model_state)
