"""Corpus formats and a tokenizer of the user's own.

Parquet (local and s3://), jsonl.gz, jsonl.zst and Hugging Face `save_to_disk` folders each give a
dataset byte-identical to the same text given as plain JSONL: the same manifest bytes, the same
shard and tokenizer files. A wrong text field, a value that is not a string and a damaged
compressed file each stop prep with a message naming the file, the line or row and the field. A
SentencePiece model brought with prep.tokenizer is used as it is when it has what the packer needs
(the newline control piece, EOS, byte fallback), and refused with a message saying what is missing
and how to train one that has it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core import storage
from core.manifest import load_manifest, load_manifest_tokenizer
from core.shards import read_shard
from core.tokenizer import NEWLINE_PIECE
from datasets_prep import prepare, train_tokenizer
from datasets_prep.sources import expand, parse_source, read_item

REPO = Path(__file__).parents[2]


def _records() -> list[dict]:
    """Code and prose with newlines, tabs, non-ASCII text and an empty record (skipped)."""
    records = []
    for i in range(48):
        if i % 3:
            text = (f"def function_{i}(value, *rest):\n\t\"\"\"Return value times {i}.\"\"\"\n"
                    f"    return value * {i}  # ünïcödé ✓ {i * 7}\n")
            records.append({"text": text, "domain": "code"})
        else:
            text = (f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café {i}.\n"
                    f"A second line with 😀 and  two spaces; {i * i} items.")
            records.append({"text": text, "domain": "text"})
    records.insert(5, {"text": "", "domain": "text"})
    return records


RECORDS = _records()
OPTIONS = dict(vocab_size=400, seq_len=16, shard_mb=0.01, partition_mb=4.0,
               tokenizer_sample_mb=1.0, val_fraction=0.2, progress=False)


def _jsonl(records: list[dict], field: str = "text") -> bytes:
    lines = [json.dumps({field: r["text"], "domain": r["domain"]}, ensure_ascii=False)
             for r in records]
    return ("\n".join(lines) + "\n").encode()


def _parquet(records: list[dict], field: str = "text") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({field: [r["text"] for r in records], "domain": [r["domain"] for r in records],
                      "id": list(range(len(records)))})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=7)  # several row groups, read batch by batch
    return sink.getvalue()


def _zstd(data: bytes) -> bytes:
    import zstandard

    half = len(data) // 2
    compressor = zstandard.ZstdCompressor(level=3)
    return compressor.compress(data[:half]) + compressor.compress(data[half:])  # two frames


def _save_hf(path: Path, records: list[dict], field: str = "text", splits: bool = False) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict({field: [r["text"] for r in records],
                                          "domain": [r["domain"] for r in records]})
    if splits:
        other = datasets.Dataset.from_dict({field: ["not this split"], "domain": ["text"]})
        dataset = datasets.DatasetDict({"train": dataset, "test": other})
    dataset.save_to_disk(str(path))


def _dataset_files(out: Path) -> dict[str, bytes]:
    """manifest.json and every file it names (the tokenizer's metadata beside them records which
    sources trained it, so it differs between the formats by design)."""
    manifest = load_manifest(str(out / "manifest.json"))
    return {path: (out / path).read_bytes() for path in ["manifest.json", *manifest.paths]}


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """The records as plain JSONL, prepared once: (source dir, out dir)."""
    root = tmp_path_factory.mktemp("formats")
    (root / "ref").mkdir()
    (root / "ref" / "corpus.jsonl").write_bytes(_jsonl(RECORDS))
    manifest_url = prepare(f"jsonl:{root}/ref", out=str(root / "out-ref"), **OPTIONS)
    manifest = load_manifest(manifest_url)
    assert len(manifest.select("code", "train")) > 3 and manifest.select("text", "val")
    return root, root / "out-ref"


def _write_format(fmt: str, root: Path) -> str:
    """The same records in format `fmt` under root/fmt; returns the source string."""
    base = root / fmt
    base.mkdir()
    if fmt == "parquet":
        (base / "corpus.parquet").write_bytes(_parquet(RECORDS, field="content"))
        (base / "_SUCCESS").write_bytes(b"")  # what Spark leaves beside its files: not read
        return f"parquet:{base}?text_field=content"
    if fmt == "jsonl.gz":
        (base / "corpus.jsonl.gz").write_bytes(gzip.compress(_jsonl(RECORDS)))
        return f"jsonl:{base}?glob=*.jsonl.gz"
    if fmt == "jsonl.zst":
        (base / "corpus.jsonl.zst").write_bytes(_zstd(_jsonl(RECORDS, field="body")))
        return f"jsonl:{base}?glob=*.jsonl*&text_field=body"
    if fmt == "hf":
        _save_hf(base / "saved", RECORDS, field="content")
        return f"hf:{base}/saved?text_field=content"
    if fmt == "hf-splits":
        _save_hf(base / "saved", RECORDS, splits=True)
        return f"hf:{base}/saved?split=train"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz", "jsonl.zst", "hf", "hf-splits"])
def test_format_gives_the_same_dataset_as_plain_jsonl(reference, fmt):
    root, ref_out = reference
    source = _write_format(fmt, root)
    out = root / f"out-{fmt}"
    manifest_url = prepare(source, out=str(out), **OPTIONS)
    assert Path(manifest_url).read_bytes() == (ref_out / "manifest.json").read_bytes()
    assert _dataset_files(out) == _dataset_files(ref_out)  # every shard and the tokenizer


def test_parquet_on_s3_gives_the_same_dataset_as_plain_jsonl(reference, s3_env, tmp_path):
    _, ref_out = reference
    base = f"s3://corpora/formats-{tmp_path.name}"
    storage.write_bytes(f"{base}/part-0.parquet", _parquet(RECORDS, field="content"))
    manifest_url = prepare(f"parquet:{base}?text_field=content", out=str(tmp_path / "out"),
                           **OPTIONS)
    assert Path(manifest_url).read_bytes() == (ref_out / "manifest.json").read_bytes()
    assert _dataset_files(tmp_path / "out") == _dataset_files(ref_out)


def test_record_domain_wins_unless_domain_field_is_cleared(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c"], "domain": ["code", None, "text"],
                             "lang": ["py", "en", "en"]}), tmp_path / "x.parquet")

    def domains(source: str) -> list[str]:
        return [d.domain for item in expand(parse_source(source)) for d in read_item(item)]

    assert domains(f"parquet:{tmp_path}") == ["code", "text", "text"]
    assert domains(f"parquet:{tmp_path}?domain=code") == ["code", "code", "text"]
    assert domains(f"parquet:{tmp_path}?domain=code&domain_field=") == ["code"] * 3
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/x.parquet: row 0: unknown domain "
                                                   f"'py'")):
        domains(f"parquet:{tmp_path}?domain_field=lang")


# ---------------------------------------------------------------------------------------------
# Errors that name the file, the line or row, and the field


def _documents(source: str) -> list:
    return [doc for item in expand(parse_source(source)) for doc in read_item(item)]


def _parquet_table(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_wrong_text_field_names_the_file_the_line_and_the_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "id": 1}\n')
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/a.jsonl:1: no 'content' field (the record has 'text', 'id'); set "
            f"text_field= in the source to the field that holds the text")):
        _documents(f"jsonl:{tmp_path}/a.jsonl?text_field=content")
    _parquet_table(tmp_path / "b.parquet", text=["x"], id=[1])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/b.parquet: no column 'content' (columns: text, id); set text_field=")):
        _documents(f"parquet:{tmp_path}/b.parquet?text_field=content")
    _save_hf(tmp_path / "saved", RECORDS[:3])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/saved: no column 'content' (columns: text, domain); set text_field=")):
        _documents(f"hf:{tmp_path}/saved?text_field=content")


def test_a_value_that_is_not_a_string_is_named(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": ["a"]}\n'))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/a.jsonl.gz:2: field 'text' is a list, not a string ([\"a\"])")):
        _documents(f"jsonl:{tmp_path}/a.jsonl.gz")
    _parquet_table(tmp_path / "ints.parquet", text=[1, 2])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/ints.parquet: column 'text' holds int64, not strings")):
        _documents(f"parquet:{tmp_path}/ints.parquet")
    _parquet_table(tmp_path / "nulls.parquet", text=["a", "b", None])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/nulls.parquet: row 2: field 'text' is null, not a string")):
        _documents(f"parquet:{tmp_path}/nulls.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": [1.5]}).save_to_disk(str(tmp_path / "floats"))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/floats: column 'text' holds double, not strings")):
        _documents(f"hf:{tmp_path}/floats")


@pytest.mark.parametrize("name, data, message", [
    ("bad.jsonl.zst", b"this is not zstd at all", "is not a valid zstd file (zstd decompress"),
    ("cut.jsonl.zst", None, "is not a valid zstd file (it ends inside a frame: truncated?)"),
    ("bad.jsonl.gz", b"this is not gzip", "is not a valid gzip file"),
    ("cut.jsonl.gz", gzip.compress(_jsonl(RECORDS))[:300], "is not a valid gzip file"),
    ("bad.parquet", b"PAR1 not really", "is not a valid Parquet file"),
])
def test_damaged_files_are_named(tmp_path, name, data, message):
    if data is None:
        data = _zstd(_jsonl(RECORDS))[:-20]
    (tmp_path / name).write_bytes(data)
    kind = "parquet" if name.endswith(".parquet") else "jsonl"
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/{name} {message}")):
        _documents(f"{kind}:{tmp_path}/{name}")


def test_damaged_file_inside_a_ray_task_surfaces_as_its_own_error(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(_zstd(_jsonl(RECORDS))[:-20])
    with pytest.raises(ValueError) as raised:
        prepare(f"jsonl:{tmp_path}/in", out=str(tmp_path / "out"), **OPTIONS)
    assert str(raised.value).startswith(f"{tmp_path}/in/a.jsonl.zst is not a valid zstd file")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_hf_split_and_location_errors(tmp_path):
    _save_hf(tmp_path / "saved", RECORDS[:3], splits=True)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path}/saved has no split 'validation': its splits are ['test', 'train']")):
        _documents(f"hf:{tmp_path}/saved?split=validation")
    assert [d.text for d in _documents(f"hf:{tmp_path}/saved?split=test")] == ["not this split"]
    with pytest.raises(storage.StorageNotFound, match="is not a directory: hf: takes a folder"):
        _documents(f"hf:{tmp_path}/missing")
    with pytest.raises(ValueError, match="hf:s3://corpora/x: Hugging Face folders are read from "
                                         "local disk only"):
        _documents("hf:s3://corpora/x")


def test_hf_hub_name_that_cannot_be_loaded_says_what_to_check(tmp_path):
    # Hub names go through datasets.load_dataset; offline, an unknown name fails at once.
    code = ("from datasets_prep.sources import expand, parse_source\n"
            "expand(parse_source('hf:mmrec-tests/no-such-dataset?split=train'))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert ("ValueError: could not load the Hugging Face dataset 'mmrec-tests/no-such-dataset' "
            "(config None, split 'train')") in result.stderr
    assert "check the name, the network and HF_TOKEN" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bring your own SentencePiece model


def _train_spm(path: Path, **settings) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for r in RECORDS for line in r["text"].split("\n") if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3), model_writer=model, vocab_size=400, model_type="unigram",
        add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        **{"byte_fallback": True, "normalization_rule_name": "identity",
           "remove_extra_whitespaces": False, **settings})
    path.write_bytes(model.getvalue())
    return model.getvalue()


def test_own_tokenizer_is_used_and_its_vocabulary_wins(reference, s3_env, tmp_path, caplog):
    root, _ = reference
    model = train_tokenizer([r["text"] for r in RECORDS], 420, num_threads=1).model_bytes
    url = f"s3://corpora/tokenizers-{tmp_path.name}/mine.model"
    storage.write_bytes(url, model)
    with caplog.at_level(logging.INFO, logger="datasets_prep"):
        manifest_url = prepare(f"jsonl:{root}/ref", out=str(tmp_path / "out"),
                               **{**OPTIONS, "vocab_size": 32000, "tokenizer": url})
    manifest = load_manifest(manifest_url)
    tokenizer = load_manifest_tokenizer(manifest_url)
    assert tokenizer.model_bytes == model
    assert manifest.tokenizer_sha256 == hashlib.sha256(model).hexdigest()
    assert manifest.vocab_size == tokenizer.vocab_size != 32000
    assert any(f"prep.vocab_size=32000 is ignored: the tokenizer {url} has "
               f"{tokenizer.vocab_size} pieces" in r.getMessage() for r in caplog.records)
    meta = json.loads((tmp_path / "out" / manifest.tokenizer_path).with_suffix(".json").read_text())
    assert meta["source"] == url and "trained_with" not in meta
    # the shards hold the corpus encoded with exactly that model
    expected = []
    for record in RECORDS:
        if record["domain"] == "code" and record["text"]:
            from core.shards import split_of

            if split_of(record["text"], OPTIONS["val_fraction"]) == "train":
                expected += tokenizer.encode(record["text"]) + [tokenizer.eos_id]
    rows = [read_shard((tmp_path / "out" / s.path).read_bytes(), name=s.path,
                       expected_sha256=s.sha256, expected_samples=s.samples,
                       sample_tokens=OPTIONS["seq_len"] + 1)
            for s in manifest.select("code", "train")]
    stream = [int(t) for shard in rows for row in shard for t in row]
    assert stream and stream == expected[:len(stream)]


@pytest.mark.parametrize("settings, missing", [
    ({}, f"no '{NEWLINE_PIECE}' control piece"),
    ({"user_defined_symbols": [NEWLINE_PIECE]},
     f"'{NEWLINE_PIECE}' is a normal or user-defined piece, not a control piece"),
    ({"control_symbols": [NEWLINE_PIECE], "byte_fallback": False}, "no byte fallback"),
    ({"control_symbols": [NEWLINE_PIECE], "eos_id": -1}, "no end-of-sequence id"),
    ({"control_symbols": [NEWLINE_PIECE], "normalization_rule_name": "nmt_nfkc"},
     "does not give text back unchanged"),
])
def test_own_tokenizer_without_what_the_packer_needs_is_refused(tmp_path, settings, missing):
    path = tmp_path / "theirs.model"
    _train_spm(path, **settings)
    with pytest.raises(ValueError) as raised:
        prepare(f"jsonl:{tmp_path}", out=str(tmp_path / "out"),
                **{**OPTIONS, "tokenizer": str(path)})
    message = str(raised.value)
    assert message.startswith(f"the tokenizer {path} cannot be used to pack this dataset: it has ")
    assert missing in message
    assert "datasets_prep.train_tokenizer(texts, vocab_size)" in message
    assert f"control_symbols=['{NEWLINE_PIECE}']" in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))


def test_own_tokenizer_that_is_not_a_model_or_is_missing(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(_jsonl(RECORDS))
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=re.escape(f"the tokenizer {tmp_path}/junk.model is not a "
                                                   f"SentencePiece model")):
        prepare(f"jsonl:{tmp_path}/in.jsonl", out=str(tmp_path / "out"),
                **{**OPTIONS, "tokenizer": str(tmp_path / "junk.model")})
    with pytest.raises(storage.StorageNotFound, match=re.escape(
            f"the tokenizer {tmp_path}/none.model (prep.tokenizer) does not exist")):
        prepare(f"jsonl:{tmp_path}/in.jsonl", out=str(tmp_path / "out"),
                **{**OPTIONS, "tokenizer": str(tmp_path / "none.model")})
