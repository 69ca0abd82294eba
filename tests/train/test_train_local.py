"""launchers.train_local over a real prepared dataset (synthetic text, real shards and manifest)."""
from __future__ import annotations

import pytest

from cluster.synthetic_data import write_synthetic_dataset
from launchers.generate import main as generate_main
from launchers.train_local import main
from mmrec.train import read_export


def test_train_local_runs_stages_on_a_manifest_and_resumes(tmp_path, capsys):
    manifest = write_synthetic_dataset(tmp_path / "data", seq_len=16, train_samples=32, val_samples=8)
    common = ["--data", manifest, "--set", "micro_batch_size=2", "--set", "warmup_steps=1", "--set", "eval_every=2",
              "--set", "eval_batches=2", "--set", "log_every=100", "--set", "checkpoint_every=2"]
    assert main(["--stage", "stage1", "--out", str(tmp_path / "s1"), "--set", "max_steps=4", *common]) == 0
    base = read_export(tmp_path / "s1" / "best")
    assert base.kind == "expert" and base.model_config.vocab_size == 256 and base.model_config.seq_len == 16
    # A longer run in the same directory resumes at step 4 instead of starting over.
    with pytest.warns(UserWarning, match=r"changed TrainConfig values .*'max_steps': \(4, 6\)"):
        assert main(["--stage", "stage1", "--out", str(tmp_path / "s1"), "--set", "max_steps=6", *common]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert read_export(tmp_path / "s1" / "final").info["step"] == 6
    assert main(["--stage", "stage2-code", "--out", str(tmp_path / "s2"), "--init-from", str(tmp_path / "s1" / "best"),
                 "--set", "max_steps=2", *common]) == 0
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(tmp_path / "s2" / "final"), "--prompt", "def ", "--max-new-tokens", "3",
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    with pytest.raises(SystemExit):
        main(["--stage", "stage1", "--out", str(tmp_path / "x"), "--set", "seq_len=32", *common])
