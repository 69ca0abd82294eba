"""Bad input to prepare() stops early with a message that says what is wrong and what to do,
and leaves no manifest behind that would describe a dataset which was never written."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.storage import StorageError, StorageNotFound
from datasets_prep import prepare
from core.manifest import load_manifest

TINY = dict(vocab_size=300, seq_len=4, progress=False)


def _corpus(root, files: dict[str, bytes]) -> str:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return str(root)


def test_missing_source_directory_is_named_before_any_work(tmp_path):
    with pytest.raises(StorageNotFound, match=f"{tmp_path}/nope is not a file or directory"):
        prepare(f"dir:{tmp_path}/nope?domain=code", out=str(tmp_path / "out"), **TINY)
    assert not (tmp_path / "out" / "tokenizers").exists()


def test_output_under_a_file_is_a_clear_storage_error(tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.py": b"x = 1\n"})
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the output directory .* choose a writable"):
        prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "file" / "out"), **TINY)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_read_only_output_directory_is_refused(tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.py": b"x = 1\n"})
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(StorageError, match="is not writable by this user"):
        prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "ro"), **TINY)


def test_corpus_of_binary_files_only_says_there_is_no_text(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.bin": bytes(range(256)), "b.bin": b"\xff\xfe\x00"})
    with pytest.raises(ValueError, match=r"hold no UTF-8 text .* check the paths and globs"):
        prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "out"), **TINY)


def test_single_document_that_hashes_to_val_explains_the_split(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.py": b"def f():\n    return 1\n" * 20})
    with pytest.raises(ValueError, match=r"0 of them \(with EOS\) in the train split.* also lower "
                                         r"val_fraction, now 0.999"):
        prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "out"), vocab_size=300,
                seq_len=4, val_fraction=0.999, progress=False)


def test_corpus_too_small_for_one_sample_writes_no_manifest(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.py": b"def f():\n    return 1\n" * 20})
    with pytest.raises(ValueError, match=r"not enough for one sample of seq_len \+ 1 = "
                                         r"100001 tokens; add data or lower seq_len"):
        prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "out"), vocab_size=300,
                seq_len=100_000, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_vocab_larger_than_the_corpus_supports_warns_and_records_the_real_size(ray_local,
                                                                               tmp_path, caplog):
    text = "".join(f"def function_{i}(value):\n    return value * {i}\n\n" for i in range(200))
    corpus = _corpus(tmp_path / "in", {"a.py": text.encode()})
    with caplog.at_level(logging.WARNING, logger="datasets_prep"):
        manifest_url = prepare(f"dir:{corpus}?domain=code", out=str(tmp_path / "out"),
                               vocab_size=20000, seq_len=8, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.search(r"supports only \d+ of the 20000 pieces asked for", m) for m in warned)
    manifest = load_manifest(manifest_url)
    assert 260 < manifest.vocab_size < 20000  # byte pieces, specials and some merges
    assert sum(s.samples for s in manifest.select("code", "train")) > 0


def test_too_small_vocab_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        prepare("demo", out=str(tmp_path / "out"), vocab_size=100, seq_len=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_file_matched_by_two_sources_is_an_error_not_a_duplicate(tmp_path):
    corpus = _corpus(tmp_path / "in", {"a.py": b"x = 1\n", "b.md": b"# b\n"})
    with pytest.raises(ValueError, match=rf"{corpus}/a.py is matched by two sources, "
                                         rf"'dir:{corpus}\?glob=\*.py&domain=code' and "
                                         rf"'dir:{corpus}\?domain=text'"):
        prepare([f"dir:{corpus}?glob=*.py&domain=code", f"dir:{corpus}?domain=text"],
                out=str(tmp_path / "out"), **TINY)


def test_unreadable_tokenizer_metadata_means_retrain_not_a_json_traceback(ray_local, tmp_path):
    text = "".join(f"def function_{i}(value):\n    return value * {i}\n\n" for i in range(100))
    corpus = _corpus(tmp_path / "in", {"a.py": text.encode()})
    out = tmp_path / "out"
    options = dict(TINY, val_fraction=0.0)  # one document: keep it in train
    first = load_manifest(prepare(f"dir:{corpus}?domain=code", out=str(out), **options))
    meta = out / first.tokenizer_path.replace("tokenizer.model", "tokenizer.json")
    meta.write_text("{ truncated")
    second = load_manifest(prepare(f"dir:{corpus}?domain=code", out=str(out), **options))
    assert second.fingerprint == first.fingerprint  # same tokenizer retrained, same shards
    assert json.loads(meta.read_text())["sha256"] == first.tokenizer_sha256


def test_cli_names_a_missing_source_without_a_traceback(tmp_path):
    repo = Path(__file__).parents[2]
    result = subprocess.run([sys.executable, "-m", "launchers.prep", "--source",
                             f"dir:{tmp_path}/nope?domain=code", "--out", str(tmp_path / "out"),
                             "--vocab-size", "300", "--no-progress"],
                            cwd=repo, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2
    # one line: the CLI's prefix ("prep failed:" or "python -m launchers.prep: error:"), the reason
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f": {tmp_path}/nope is not a file or directory")
