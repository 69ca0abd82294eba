"""The launchers' shared dialect and what users get from them: --print-config round trip, console
scripts, generate and eval on real exports agreeing with the library functions they wrap."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from core.config import Config
from core.tokenizer import load_tokenizer
from mmrec.evaluation import path_forward, score_rows, validation_batches
from mmrec.train import Trainer, build_from_export, generate, read_export, step_fn_for
from tests.support.synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from core.config import resolve

    tmp = tmp_path_factory.mktemp("cli")
    manifest = write_synthetic_dataset(tmp / "data", seq_len=16, train_samples=48, val_samples=16)
    cfg = resolve({"model": {"name": "tiny", "d_model": 32, "n_layers": 2, "ffn_dim": 64, "n_heads": 2},
                   "train": dict(seq_len=16, micro_batch_size=2, max_steps=4, warmup_steps=1, eval_every=2,
                                 eval_batches=1, checkpoint_every=2, precision="fp32"),
                   "data": {"manifest": manifest}, "run": {"storage_path": str(tmp / "runs")}}, stage="stage1")
    result = Trainer(cfg).fit()
    return manifest, result, tmp


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_print_config_prints_toml_that_loads_back(tmp_path):
    ran = run_cli("launchers.train", "--stage", "stage2-code", "--config", "configs/smoke.toml", "--set", "train.lr=5e-4",
                  "--print-config")
    assert ran.returncode == 0, ran.stderr
    printed = tomllib.loads(ran.stdout)
    assert printed["stage"] == "stage2-code" and printed["train"]["lr"] == 5e-4
    assert printed["engine"]["kind"] == "deepspeed" and "prep" not in printed  # only what train reads
    Config.from_dict(printed)  # a valid config tree


def test_console_scripts_are_installed():
    script = Path(sys.executable).with_name("mmrec-train")
    assert script.is_file(), "pip install -e . installs the console scripts"
    ran = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.startswith("usage: mmrec-train")


def test_generate_prints_what_the_library_generates(trained):
    _, result, _ = trained
    ran = run_cli("launchers.generate", "--export", "run:stage1", "--set", f"run.storage_path={Path(result.run_url).parent}",
                  "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0", "--no-stop-at-eos")
    assert ran.returncode == 0, ran.stderr
    export = read_export(result.best_export)
    tokenizer = load_tokenizer(export.directory)
    model = build_from_export(export)
    expected = generate(step_fn_for(model), tokenizer.encode("def f"), 12, temperature=0.0)
    assert ran.stdout == "def f" + tokenizer.decode(expected) + "\n"
    several = run_cli("launchers.generate", "--export", result.best_export, "--prompt", "the", "--num-samples", "3",
                      "--seed", "1", "--top-p", "0.9")
    assert several.returncode == 0 and several.stdout.count("--- sample ") == 3


def test_eval_scores_a_manifest_and_raw_jsonl_like_the_library(trained, tmp_path):
    manifest, result, _ = trained
    out = tmp_path / "table.json"
    ran = run_cli("launchers.eval", "--export", result.best_export, "--data", manifest, "--json", str(out))
    assert ran.returncode == 0, ran.stderr
    table = json.loads(out.read_text())["table"]
    model = build_from_export(read_export(result.best_export))
    expected = score_rows(path_forward(model, "expert"), validation_batches(manifest, ("code",))).result()
    assert table["expert"]["code"]["loss"] == pytest.approx(expected.loss, rel=1e-9)
    assert set(table["expert"]) == {"text", "code", "mixed"}
    # Raw text: the same documents as JSONL, tokenized with the export's tokenizer.
    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("".join(json.dumps({"text": "def f(x):\n    return x + 1\n" * 20}) + "\n" for _ in range(4)))
    ran = run_cli("launchers.eval", "--export", result.best_export, "--data", str(jsonl), "--json", str(out))
    assert ran.returncode == 0, ran.stderr
    scores = json.loads(out.read_text())["table"]["expert"]["text"]
    assert scores["tokens"] > 0 and 0 < scores["loss"] < 20
