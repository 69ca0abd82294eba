"""Bad input a user meets, one case each: every launcher ends with `<prog>: error: ...` naming the file or
key and exit code 2, never a traceback, and nothing is trained, written or started first."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from .conftest import SEQ_LEN, launch, train_args


def assert_usage_error(ran, *needles: str) -> None:
    assert ran.code == 2, ran.text[-3000:]
    assert "Traceback" not in ran.text, ran.text[-3000:]
    assert ": error: " in ran.err, ran.err
    for needle in needles:
        assert needle in ran.err, ran.err


def test_generate_usage_errors(base_export, tmp_path):
    export = str(base_export)
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", ""), "the prompt is empty")
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", "x", "--top-k", "-1"),
                       "generate.top_k=-1")
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", "x", "--top-p", "1.5"),
                       "generate.top_p=1.5")
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", "x", "--temperature", "-1"),
                       "generate.temperature")
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", "x", "--max-new-tokens", "0"),
                       "generate.max_new_tokens=0")
    assert_usage_error(launch("launchers.generate", "--export", str(tmp_path / "nothing"), "--prompt", "x"),
                       "is not a weights export")
    assert_usage_error(launch("launchers.generate", "--export", "run:stage9", "--prompt", "x",
                              "--set", f"run.storage_path={tmp_path}"), "run 'stage9' has no export")
    assert_usage_error(launch("launchers.generate", "--export", export, "--prompt", "x", "--path", "text"),
                       "--path applies to a fused")
    # Damaged exports: truncated weights, unreadable export.json, missing tokenizer.
    broken = tmp_path / "broken"
    shutil.copytree(base_export, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_usage_error(launch("launchers.generate", "--export", str(broken), "--prompt", "x"), "truncated or corrupt")
    shutil.rmtree(broken)
    shutil.copytree(base_export, broken)
    (broken / "config.json").write_text("{ nope")
    assert_usage_error(launch("launchers.generate", "--export", str(broken), "--prompt", "x"), "config.json is not valid JSON")
    shutil.rmtree(broken)
    shutil.copytree(base_export, broken)
    (broken / "tokenizer.model").unlink()
    assert_usage_error(launch("launchers.generate", "--export", str(broken), "--prompt", "x"), "no tokenizer.model")


def test_train_refuses_bad_inputs_before_training(manifest, base_export, tmp_path):
    runs = tmp_path / "runs"
    missing = launch("launchers.train", *train_args(str(tmp_path / "none" / "manifest.json"), runs))
    assert_usage_error(missing, "manifest.json does not exist", "launchers.prep")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, stage="stage2-text")),
                       "stage2-text needs run.init_from")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", f"run.init_from={tmp_path / 'x'}",
                                                             stage="stage2-text")), "run.init_from=")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", "train.seq_len=32")),
                       "train.seq_len=32", f"seq_len {SEQ_LEN}")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", "model.vocab_size=4096")),
                       "model.vocab_size=4096 but the dataset's tokenizer has")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", "train.lr=fast")),
                       "train.lr='fast'")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", "run.plots=yes")),
                       "run.plots='yes': must be true or false")
    assert_usage_error(launch("launchers.train", *train_args(manifest, runs, "--set", "train.max_stepz=3")),
                       "unknown key 'max_stepz' in [train] (did you mean 'max_steps'?)")
    assert_usage_error(launch("launchers.train", "--set", f"data.manifest={manifest}"), "no stage given")
    assert not runs.exists() or not any(runs.rglob("step_*")), "nothing may be trained for a refused run"


def _copy_dataset(manifest: str, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(Path(manifest).parent, copy)
    return copy / "manifest.json"


def test_a_damaged_dataset_is_refused_with_its_reason(manifest, tmp_path):
    runs = tmp_path / "runs"
    swapped = _copy_dataset(manifest, tmp_path / "a")
    (swapped.parent / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert_usage_error(launch("launchers.train", *train_args(str(swapped), runs)), "tokenizer", "sha256")
    as_list = _copy_dataset(manifest, tmp_path / "b")
    as_list.write_text(json.dumps([1, 2, 3]))
    assert_usage_error(launch("launchers.train", *train_args(str(as_list), runs)), "not a usable manifest")
    extra_key = _copy_dataset(manifest, tmp_path / "c")
    data = json.loads(extra_key.read_text())
    data["shards"][0]["colour"] = "blue"
    extra_key.write_text(json.dumps(data))
    assert_usage_error(launch("launchers.train", *train_args(str(extra_key), runs)), "not a usable manifest")


def test_prep_usage_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_usage_error(launch("launchers.prep", "--source", "demo?max_mb=0.1", "--out", str(a_file)), str(a_file))
    assert_usage_error(launch("launchers.prep", "--source", "dir:/nonexistent?domain=code", "--out", str(tmp_path / "o")),
                       "/nonexistent")
    assert_usage_error(launch("launchers.prep", "--source", "demo", "--out", str(tmp_path / "o"), "--vocab-size", "10"),
                       "prep.vocab_size=10 is too small")
    assert_usage_error(launch("launchers.prep", "--source", "demo"), "no output directory")


def test_pipeline_refuses_what_it_cannot_run(tmp_path):
    assert_usage_error(launch("launchers.pipeline", "--out", str(tmp_path), "--num-cpus", "0"), "pipeline.num_cpus=0")
    assert_usage_error(launch("launchers.pipeline", "--out", str(tmp_path), "--set", "prep.vocab_size=10"),
                       "prep.vocab_size=10")
    assert_usage_error(launch("launchers.pipeline", "--out", str(tmp_path), "--set", "scaling.num_workers=4"),
                       "needs 4 CPUs", "pipeline.num_cpus=2")
    assert not (tmp_path / "data").exists()


def test_eval_usage_errors(base_export, manifest, tmp_path):
    assert_usage_error(launch("launchers.eval", "--export", str(base_export)), "give both --export")
    assert_usage_error(launch("launchers.eval", "--export", str(base_export), "--data", str(tmp_path / "x.txt")),
                       "is neither a manifest.json")
    assert_usage_error(launch("launchers.eval", "--export", str(base_export), "--data", manifest, "--path", "text"),
                       "--path text")
