"""Corpus sources: dir: with globs and domain labels, jsonl: with and without per-record domains,
both from a local directory and from the real S3 server, and man pages turned into plain text."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from core import storage
from datasets_prep import prepare
from core.manifest import load_manifest, load_manifest_tokenizer
from datasets_prep.roff import strip_roff
from core.shards import read_shard
from datasets_prep.sources import expand, parse_source, read_item

FILES = {
    "src/a.py": "def a():\n    return 1\n",
    "src/pkg/b.py": "import os\n\n\tprint(os.sep)  \n",
    "src/notes.md": "# Notes\nsome prose, ünïcode ✓\n",
    "src/g.c++": "int main() { return 0; }\n",
    "data/a.jsonl": "\n".join([json.dumps({"text": "hello world"}),
                               json.dumps({"text": "def f(): pass", "domain": "code"}),
                               "",
                               json.dumps({"text": ""}),
                               json.dumps({"text": "plain prose", "domain": "text"})]) + "\n",
    "data/sub/b.jsonl": json.dumps({"text": "second file\nwith two lines"}) + "\n",
}
BINARY = {"src/pkg/blob.bin": bytes(range(256))}


@pytest.fixture(params=["local", "s3"])
def corpus(request, tmp_path) -> str:
    """The same small corpus under a local directory or an s3:// prefix; returns its base URL."""
    if request.param == "local":
        base = str(tmp_path / "corpus")
    else:
        request.getfixturevalue("s3_env")
        base = f"s3://corpora/sources-{tmp_path.name}"
    for name, text in FILES.items():
        storage.write_bytes(storage.join(base, name), text.encode())
    for name, data in BINARY.items():
        storage.write_bytes(storage.join(base, name), data)
    return base


def _documents(source: str) -> list[tuple[str, str, str]]:
    return [(doc.doc_id, doc.domain, doc.text)
            for item in expand(parse_source(source)) for doc in read_item(item)]


def test_dir_glob_matches_at_any_depth_and_labels_the_domain(corpus):
    docs = _documents(f"dir:{corpus}/src?glob=*.py&domain=code")
    assert docs == [(f"{corpus}/src/a.py", "code", FILES["src/a.py"]),
                    (f"{corpus}/src/pkg/b.py", "code", FILES["src/pkg/b.py"])]
    assert _documents(f"dir:{corpus}/src?glob=*.md&domain=text") == [
        (f"{corpus}/src/notes.md", "text", FILES["src/notes.md"])]
    # '+' is part of the glob, not a URL-encoded space
    assert [d[0] for d in _documents(f"dir:{corpus}/src?glob=*.c%2B%2B&domain=code")] == \
        [d[0] for d in _documents(f"dir:{corpus}/src?glob=*.c++&domain=code")] == \
        [f"{corpus}/src/g.c++"]


def test_dir_without_glob_takes_every_text_file_and_skips_binaries(corpus):
    items = expand(parse_source(f"dir:{corpus}/src?domain=text"))
    assert [item.url.rsplit("/src/", 1)[1] for item in items] == [
        "a.py", "g.c++", "notes.md", "pkg/b.py", "pkg/blob.bin"]
    assert [item.size for item in items][-1] == 256
    docs = [doc for item in items for doc in read_item(item)]
    assert len(docs) == 4 and {doc.domain for doc in docs} == {"text"}


def test_jsonl_record_domain_wins_over_source_domain(corpus):
    without = _documents(f"jsonl:{corpus}/data?glob=*.jsonl")
    assert without == [(f"{corpus}/data/a.jsonl#1", "text", "hello world"),
                       (f"{corpus}/data/a.jsonl#2", "code", "def f(): pass"),
                       (f"{corpus}/data/a.jsonl#5", "text", "plain prose"),
                       (f"{corpus}/data/sub/b.jsonl#1", "text", "second file\nwith two lines")]
    labelled = _documents(f"jsonl:{corpus}/data?glob=*.jsonl&domain=code")
    assert [d[1] for d in labelled] == ["code", "code", "text", "code"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["text", "a list"]', "expected a JSON object with a string 'text' field"),
    ('{"text": 5}', "field 'text' is a number, not a string (5)"),
    ('{"text": null}', "field 'text' is null, not a string"),
    ('{"body": "no text"}', "no 'text' field (the record has 'body'); set text_field= in the "
                            "source"),
    ('{"text": "x", "domain": "math"}', "unknown domain 'math'"),
])
def test_malformed_jsonl_line_names_file_and_line(corpus, line, message):
    url = storage.join(corpus, "bad", "x.jsonl")
    storage.write_bytes(url, (json.dumps({"text": "fine"}) + "\n" + line + "\n").encode())
    with pytest.raises(ValueError, match=re.escape(f"{url}:2: {message}")):
        _documents(f"jsonl:{corpus}/bad")


def test_jsonl_that_is_not_utf8_is_an_error_not_silently_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        _documents(f"jsonl:{path}")


@pytest.mark.parametrize("source, message", [
    ("dir:/tmp", "needs a domain: add ?domain=text"),
    ("dir:/tmp?domain=prose", "unknown domain 'prose'"),
    ("dir:/tmp?glob", "'glob' is not key=value"),
    ("demo?max_mb=lots", "max_mb must be a number of megabytes, got 'lots'"),
    ("demo:/data", "demo takes no location"),
    ("jsonl:", "needs a location"),
    ("csv:/data", "unknown source kind 'csv'"),
    ("demo?glob=*.py", "unknown key 'glob' in source 'demo?glob=*.py': allowed are ['max_mb']"),
    ("dir:/data?text_field=body&domain=text", "unknown key 'text_field'"),
    ("hf:/data?glob=*.arrow", "unknown key 'glob'"),
    ("jsonl:/data?text_field=", "text_field= needs a field name"),
])
def test_bad_source_strings_say_what_to_write(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_source(source)


def test_sources_that_match_nothing_or_do_not_exist_are_named(corpus):
    with pytest.raises(ValueError, match=r"matched no files \(glob='\*\.rs'\)"):
        expand(parse_source(f"dir:{corpus}/src?glob=*.rs&domain=code"))
    missing = f"{corpus}/no-such-dir"
    with pytest.raises((storage.StorageNotFound, ValueError), match=re.escape(missing)):
        expand(parse_source(f"dir:{missing}?domain=code"))


def test_prepare_packs_dir_and_jsonl_documents_from_s3_exactly(s3_env, ray_local, tmp_path):
    base = f"s3://corpora/prep-sources-{tmp_path.name}"
    for name, text in FILES.items():
        storage.write_bytes(storage.join(base, name), text.encode())
    source_list = [f"dir:{base}/src?glob=*.py&domain=code", f"jsonl:{base}/data?glob=*.jsonl"]
    manifest_url = prepare(source_list, out=str(tmp_path / "out"), vocab_size=300, seq_len=4,
                           val_fraction=0.0, progress=False)
    manifest = load_manifest(manifest_url)
    tokenizer = load_manifest_tokenizer(manifest_url)
    items = sorted((item for source in source_list for item in expand(parse_source(source))),
                   key=lambda item: item.url)
    for domain in ("text", "code"):
        expected = []
        for doc in (doc for item in items for doc in read_item(item)):
            if doc.domain == domain:
                expected += tokenizer.encode(doc.text) + [tokenizer.eos_id]
        rows = [read_shard((tmp_path / "out" / s.path).read_bytes(), name=s.path,
                           expected_sha256=s.sha256, expected_samples=s.samples,
                           sample_tokens=5) for s in manifest.select(domain, "train")]
        stream = [int(t) for shard in rows for row in shard for t in row]
        assert len(stream) == len(expected) // 5 * 5 > 0
        assert stream == expected[:len(stream)]  # every document, in order, nothing lost
    assert manifest.stats["documents"] == 6


def test_bad_record_inside_a_ray_task_surfaces_as_its_own_clear_error(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError) as raised:
        prepare(f"jsonl:{tmp_path}/in", out=str(tmp_path / "out"), vocab_size=300, seq_len=4,
                progress=False)
    assert str(raised.value).startswith(f"{tmp_path}/in/x.jsonl:2: not valid JSON")
    assert "Traceback" not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Man pages

# Not \( or \-: pages print those literally (grep's "\e(" is the text "\(").
ROFF_LEFTOVERS = re.compile(r"^[.'](TH|SH|SS|PP|TP|IP|B|I|BR|IR|RS|RE|sp|br|nf|fi|de|ds|if|ie)\b"
                            r"|\\f[BIRP(\[]|\\[*&,/]|\\s[+-]?\d", re.MULTILINE)


def _man_page(name: str) -> str:
    path = Path("/usr/share/man/man1") / f"{name}.1.gz"
    if not path.exists():
        pytest.fail(f"{path} is missing: the data tests read real man pages (coreutils, tar, "
                    f"grep); install them or drop the man-db path-exclude from dpkg's config")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


@pytest.mark.parametrize("page", ["ls", "tar", "grep"])
def test_real_man_page_becomes_plain_text(page):
    source = _man_page(page)
    text = strip_roff(source)
    assert not ROFF_LEFTOVERS.search(text), ROFF_LEFTOVERS.search(text).group(0)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION"):
        assert f"\n{heading}\n" in f"\n{text}"
    # Lines of plain prose in the source come through unchanged.
    prose = [line for line in source.split("\n")
             if line and "\\" not in line and not line.startswith((".", "'"))]
    assert len(prose) > 20
    output_lines = set(text.split("\n"))
    assert [line for line in prose if line not in output_lines] == []


def test_ls_man_page_keeps_options_and_name_line():
    text = strip_roff(_man_page("ls"))
    assert text.startswith("NAME\nls - list directory contents\n")
    assert "-A, --almost-all\n" in text and "[OPTION]... [FILE]..." in text


def test_roff_strings_blocks_comments_and_tables():
    source = "\n".join([
        '.de XX', 'this macro body is not text', '..',
        '.ie \\n(.g .ds Aq \\(aq', '.el .ds Aq \'',
        '.TH DEMO 1', '.SH "SEE ALSO"', '.BR ls (1),', '.IP \\(bu 4',
        'run \\*(Aqecho hi\\*(Aq \\" a comment that is not text',
        'a literal backslash: \\e and \\\\" stays',
        '.TS', 'tab(:);', 'l l.', 'key:value', '.TE',
        'caf\\[u00E9] \\(em done\\c',
    ])
    assert strip_roff(source) == ("SEE ALSO\nls(1),\n*\nrun 'echo hi' \n"
                                  'a literal backslash: \\ and \\" stays\n\n'
                                  "key:value\n\ncafé -- done\n")
