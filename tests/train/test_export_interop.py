"""Exports load without the training code: config.json + model.safetensors (+ tokenizer.model) in one
folder, mmrec.save_pretrained / mmrec.from_pretrained, and what training writes is exactly that."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmrec
from mmrec import ExportError
from mmrec.train.export import export_state, read_export, write_export

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=300, d_model=32, n_layers=2, ffn_dim=64, n_heads=4, seq_len=32, chunk_size=16)


def small_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mmrec.build_base("tiny", **SMALL) if kind == "expert" else mmrec.build_model("tiny", **SMALL)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype == torch.float32, name
        assert torch.equal(sa[name], sb[name]), name  # bit for bit


@pytest.mark.parametrize("kind", ["expert", "mmrec"])
def test_save_pretrained_round_trip(kind, tmp_path):
    model = small_model(kind)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"a sentencepiece model")
    folder = mmrec.save_pretrained(model, tmp_path / "out", tokenizer_file=tokenizer, extra={"note": {"by": "test"}})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mmrec" and config["kind"] == kind and config["note"] == {"by": "test"}
    assert {k: config[k] for k in model.config.to_dict()} == model.config.to_dict()
    assert (folder / "tokenizer.model").read_bytes() == b"a sentencepiece model"
    loaded = mmrec.from_pretrained(str(folder))
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    assert_same_weights(model, loaded)
    # save(load(x)) writes the same weights file again.
    again = mmrec.save_pretrained(loaded, tmp_path / "again")
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_training_export_loads_in_a_fresh_process_with_only_mmrec(tmp_path):
    fused = small_model("mmrec", seed=1)
    state = export_state(fused)
    fused_dir = write_export(tmp_path / "stage3", state, prefix="", kind="mmrec", model_config=fused.config,
                             stage="stage3", step=7, metrics={"val_loss": 2.5})
    text_dir = write_export(tmp_path / "stage2-text", state, prefix="experts.text", kind="expert",
                            model_config=fused.config, stage="stage2-text", step=5)
    assert read_export(fused_dir).info["step"] == 7 and read_export(text_dir).info["stage"] == "stage2-text"
    assert json.loads((fused_dir / "config.json").read_text())["training"] == {
        "stage": "stage3", "step": 7, "metrics": {"val_loss": 2.5}}
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
import mmrec
from safetensors.torch import save_file
ids = torch.load({str(tmp_path / 'ids.pt')!r})
fused = mmrec.from_pretrained({str(fused_dir)!r})
text = mmrec.from_pretrained({str(text_dir)!r})
with torch.no_grad():
    out = {{"fused": fused(ids)[0], "code": fused(ids, expert="code")[0], "text": text(ids)[0]}}
save_file({{k: v.contiguous() for k, v in out.items()}}, {str(tmp_path / 'logits.safetensors')!r})
banned = ("mmrec.train", "ray", "deepspeed", "datasets_prep", "cluster", "lm_eval")
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in banned or m.startswith("mmrec.train"))))
print(type(fused).__name__, type(text).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported, kinds = done.stdout.splitlines()[-2:]
    assert imported == "", f"loading an export imported {imported}"
    assert kinds == "MMRec Expert"
    got = load_file(tmp_path / "logits.safetensors")
    with torch.no_grad():
        expected = {"fused": fused(ids)[0], "code": fused(ids, expert="code")[0], "text": fused.experts.text(ids)[0]}
    for name, logits in expected.items():
        torch.testing.assert_close(got[name], logits, rtol=0, atol=1e-6, msg=name)


def test_damaged_exports_give_clear_errors(tmp_path):
    model = small_model("expert")
    good = mmrec.save_pretrained(model, tmp_path / "good")

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in good.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        return folder

    broken_json = damaged("json")
    (broken_json / "config.json").write_text("{ nope")
    for load in (mmrec.from_pretrained, read_export):
        with pytest.raises(ExportError, match=r"config\.json is not valid JSON"):
            load(broken_json)
    truncated = damaged("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (mmrec.from_pretrained, read_export):
        with pytest.raises(ExportError, match=r"model\.safetensors is truncated or corrupt"):
            load(truncated)
    wrong_kind = damaged("kind")
    config = json.loads((wrong_kind / "config.json").read_text())
    (wrong_kind / "config.json").write_text(json.dumps({**config, "kind": "bert"}))
    with pytest.raises(ExportError, match="kind 'bert' is not one of"):
        mmrec.from_pretrained(wrong_kind)
    wrong_shape = damaged("shape")
    (wrong_shape / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(ExportError, match="the weights do not fit its config"):
        mmrec.from_pretrained(wrong_shape)
    bad_value = damaged("value")
    (bad_value / "config.json").write_text(json.dumps({**config, "n_layers": "two"}))
    with pytest.raises(ExportError, match="n_layers must be an int"):
        mmrec.from_pretrained(bad_value)
    no_config = damaged("noconfig")
    (no_config / "config.json").unlink()
    for load in (mmrec.from_pretrained, read_export):
        with pytest.raises(ExportError, match="is not a weights export"):
            load(no_config)
    with pytest.raises(ExportError, match="is not a weights export"):
        mmrec.from_pretrained(tmp_path / "missing")
    # A hub repo id that is neither a folder here nor in the cache (no network is asked for).
    with pytest.raises(ExportError, match="the Hugging Face Hub could not provide it"):
        mmrec.from_pretrained("nobody/no-such-mmrec", local_files_only=True, cache_dir=tmp_path / "hub-cache")


def test_exports_of_the_earlier_layout_still_read(tmp_path):
    model = small_model("expert")
    folder = mmrec.save_pretrained(model, tmp_path / "old")
    (folder / "config.json").unlink()
    (folder / "export.json").write_text(json.dumps({"kind": "expert", "model_config": model.config.to_dict(),
                                                    "stage": "stage1", "step": 3, "metrics": {}}))
    export = read_export(folder)
    assert export.kind == "expert" and export.model_config == model.config and export.info["step"] == 3
