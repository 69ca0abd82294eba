"""The full path on real components: demo corpus -> Ray tasks -> shards + manifest on a real S3
server -> ShardLoader reading them back; idempotent re-runs; repair of a truncated shard."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import storage
from datasets_prep import prepare
from core.manifest import load_manifest, load_manifest_tokenizer
from core.shards import sha256_hex
from core.tokenizer import SentencePieceTokenizer
from mmrec.data import CorruptShardError, ShardLoader

REPO = Path(__file__).parents[2]


def _served_files(s3_server, prefix: str) -> dict[str, int]:
    root = s3_server.root / "corpora" / prefix
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prep_writes_verified_shards_and_manifest_to_s3(prepared_s3, s3_server):
    manifest = load_manifest(prepared_s3)
    assert prepared_s3 == "s3://corpora/demo/manifest.json"
    assert {(s.domain, s.split) for s in manifest.shards} == {
        ("text", "train"), ("text", "val"), ("code", "train"), ("code", "val")}
    for shard in manifest.shards:
        data = storage.read_bytes(storage.join("s3://corpora/demo", shard.path))
        assert sha256_hex(data) == shard.sha256 and len(data) == shard.bytes
        assert shard.tokens == shard.samples * (manifest.seq_len + 1)
        # content-addressed: the name says where the shard sits in its stream and what it holds
        assert re.fullmatch(rf"{shard.domain}/{shard.split}/shard-\d{{6}}-{shard.sha256[:16]}\.tar",
                            shard.path)
    assert manifest.tokenizer_path == f"tokenizers/{manifest.tokenizer_sha256[:16]}/tokenizer.model"
    tokenizer = load_manifest_tokenizer(prepared_s3)  # checks tokenizer_sha256 and vocab_size
    assert manifest.vocab_size == tokenizer.vocab_size <= 400
    stored = json.loads((s3_server.root / "corpora/demo/manifest.json").read_text())
    assert stored["fingerprint"] == manifest.fingerprint
    # nothing but what the manifest names (and the tokenizer's metadata), no run left registered
    served = s3_server.root / "corpora/demo"
    files = {str(p.relative_to(served)) for p in served.rglob("*") if p.is_file()}
    assert files == {"manifest.json", *manifest.paths,
                     manifest.tokenizer_path.replace("tokenizer.model", "tokenizer.json")}


def test_loader_reads_s3_shards_back_into_real_text(prepared_s3):
    manifest = load_manifest(prepared_s3)
    loader = ShardLoader(prepared_s3, ["code"], micro_batch_size=4, seed=0, infinite=False)
    tokenizer = SentencePieceTokenizer.from_url(loader.tokenizer_url)
    batches = list(loader)
    code_samples = sum(s.samples for s in manifest.select("code", "train"))
    assert len(batches) == code_samples // 4
    tokens = batches[0]["tokens"]
    assert tokens.shape == (4, manifest.seq_len + 1) and batches[0]["domains"] == ["code"] * 4
    text = "".join(tokenizer.decode(row.tolist()) for batch in batches for row in batch["tokens"])
    assert "def " in text and "import " in text  # packed stdlib code, read back from S3
    assert tokens.max() < tokenizer.vocab_size
    assert any((b["tokens"] == tokenizer.eos_id).any() for b in batches)  # documents were packed


def test_rerun_is_idempotent_no_shard_rewritten(prepared_s3, s3_server, prep_args):
    source, options = prep_args
    before = _served_files(s3_server, "demo")
    etags = {name: storage.stat(f"s3://corpora/demo/{name}").version for name in before}
    manifest_text = storage.read_bytes(prepared_s3)
    assert prepare(source, out="s3://corpora/demo", **options) == prepared_s3
    assert storage.read_bytes(prepared_s3) == manifest_text
    assert _served_files(s3_server, "demo") == before  # same files, same mtimes: nothing rewritten
    assert {name: storage.stat(f"s3://corpora/demo/{name}").version for name in before} == etags


def test_truncated_shard_is_detected_then_repaired_by_rerun(prepared_s3, s3_server, prep_args,
                                                           tmp_path):
    # The manifest's relative paths make a prepared dataset portable: copy it off the bucket.
    local = tmp_path / "copy"
    shutil.copytree(s3_server.root / "corpora" / "demo", local)
    manifest = load_manifest(str(local / "manifest.json"))
    victim = manifest.select("code", "train")[1].path
    (local / victim).write_bytes((local / victim).read_bytes()[:1000])
    loader = ShardLoader(str(local / "manifest.json"), ["code"], micro_batch_size=2,
                         infinite=False)
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        list(loader)

    before = {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}
    source, options = prep_args
    prepare(source, out=str(local), **options)
    after = {p: p.stat().st_mtime_ns for p in local.rglob("*.tar")}
    changed = [str(p.relative_to(local)) for p in before if before[p] != after[p]]
    assert changed == [victim]
    assert sha256_hex((local / victim).read_bytes()) == manifest.select("code", "train")[1].sha256
    assert len(list(ShardLoader(str(local / "manifest.json"), ["code"], micro_batch_size=2,
                                infinite=False))) > 0


def test_cli_reports_wrong_secret_without_traceback(s3_server):
    env = {**os.environ, **s3_server.env(secret="not-the-secret"), "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-m", "launchers.prep", "--source", "demo?max_mb=0.1",
                             "--out", "s3://corpora/never", "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "rejected the credentials" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (s3_server.root / "corpora" / "never").exists()


def test_unknown_source_key_and_option_are_named():
    with pytest.raises(ValueError, match="unknown key 'globb'"):
        prepare("dir:/tmp?globb=*.py&domain=code", out="/tmp/unused")
    with pytest.raises(TypeError, match="unknown option 'shard_size'"):
        prepare("demo", out="/tmp/unused", shard_size=3)
