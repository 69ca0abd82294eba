"""The tokenizer gives real stdlib code back byte for byte, whitespace and unicode included."""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from core.shards import pack, pack_stream, shard_bytes
from core.tokenizer import NEWLINE_PIECE, SentencePieceTokenizer
from datasets_prep.tokenizer_training import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "string.py"]


def _has(text: str) -> set[str]:
    features = set()
    if "\t" in text:
        features.add("tab")
    if any(line != line.rstrip(" ") for line in text.split("\n")):
        features.add("trailing space")
    if any(ord(c) > 127 for c in text):
        features.add("unicode")
    if "\n\n" in text:
        features.add("blank line")
    return features


@pytest.fixture(scope="module")
def tokenizer() -> SentencePieceTokenizer:
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in TRAIN_FILES]
    return train_tokenizer(texts, vocab_size=400, num_threads=1)


def _files_with_every_feature(limit: int) -> list[Path]:
    """Real stdlib files that between them hold tabs, trailing spaces, unicode and blank lines."""
    wanted = {"tab", "trailing space", "unicode", "blank line"}
    chosen, covered = [], set()
    for path in sorted(STDLIB.rglob("*.py")):
        try:
            features = _has(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # a few stdlib test files are deliberately not UTF-8
            continue
        if features - covered and len(chosen) < limit:
            chosen.append(path)
            covered |= features
        if covered == wanted:
            break
    assert covered == wanted, f"stdlib lacks {wanted - covered}; pick other files"
    return chosen


def test_stdlib_code_round_trips_byte_for_byte(tokenizer):
    for path in _files_with_every_feature(limit=8) + [STDLIB / "test" / "test_unicode.py"]:
        if not path.exists():
            continue
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids).encode("utf-8") == raw, path
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_newline_is_its_own_piece_and_literal_marker_survives(tokenizer):
    text = f"a\tb  \n\n\r\n  x = '{NEWLINE_PIECE} ünï ✓ 🙂 12345'  \n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.newline_id) == text.count("\n")
    assert tokenizer.encode_many([text, "", "x\n"]) == [ids, [], tokenizer.encode("x\n")]
    # split_digits: no learned piece spans two digits (byte pieces like <0xF0> are not text)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces if not p.startswith("<0x"))
    assert sum(p in "12345" for p in pieces) == 5


def test_model_hash_is_checked_on_load(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tokenizer.model_bytes)
    loaded = SentencePieceTokenizer.from_url(str(path), expected_sha256=tokenizer.sha256)
    assert loaded.encode("def f():\n\treturn 1\n") == tokenizer.encode("def f():\n\treturn 1\n")
    with pytest.raises(ValueError, match="was overwritten"):
        SentencePieceTokenizer.from_url(str(path), expected_sha256="0" * 64)


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["x = 1\n"], vocab_size=100)


# ---------------------------------------------------------------------------------------------
# The packing stream: the array-building fast path against the plain per-document reference


def _reference_stream(tokenizer: SentencePieceTokenizer, texts: list[str]) -> list[int]:
    """What prep did before the fast path: encode each text alone, append EOS, join lists."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    return stream


def test_encode_stream_and_pack_equal_the_per_document_reference(tokenizer):
    rng = random.Random(1234)
    stdlib_texts = [(STDLIB / name).read_text(encoding="utf-8")
                    for name in ("textwrap.py", "this.py", "keyword.py", "colorsys.py")]
    edge_cases = ["", "\n", "\n\n\n", "a", "ünï ✓ 🙂\r\n", "x\n", f"{NEWLINE_PIECE}\n\t 12"]
    alphabet = "ab cd\n\t\r1234é🙂{}()"
    random_texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
                    for _ in range(40)]
    texts = stdlib_texts + edge_cases + random_texts
    rng.shuffle(texts)
    expected = _reference_stream(tokenizer, texts)
    for dtype in (np.dtype(np.uint16), np.dtype(np.int32)):
        stream = tokenizer.encode_stream(texts, dtype)
        assert stream.dtype == dtype and stream.tolist() == expected
        fast, fast_dropped = pack_stream(stream, 33)
        slow, slow_dropped = pack(tokenizer.encode_many(texts), tokenizer.eos_id, 33, dtype)
        assert fast_dropped == slow_dropped == len(expected) % 33
        assert shard_bytes(fast, "code", 7) == shard_bytes(slow, "code", 7)  # byte-identical shards
    assert tokenizer.encode_many(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.encode_stream([], np.dtype(np.uint16)).size == 0
    assert tokenizer.encode_many([]) == []


# ---------------------------------------------------------------------------------------------
# The fast stream (distinct lines encoded once, SentencePiece's buffer output, separators spliced
# in by index) against the plain per-text encode, on real files and on the edge cases it must keep


MAN1 = Path("/usr/share/man/man1")


def _man_pages(limit: int) -> list[str]:
    """Real man pages, as roff source and as the text prep makes of them (datasets_prep.roff)."""
    import gzip

    from datasets_prep.roff import strip_roff

    pages: list[str] = []
    for path in sorted(MAN1.glob("*.gz")) if MAN1.is_dir() else []:
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if text.startswith(".so ") or "\x00" in text:
            continue
        pages += [text, strip_roff(text)]
        if len(pages) >= 2 * limit:
            break
    return pages


def _edge_texts() -> list[str]:
    marker = NEWLINE_PIECE
    return [
        "", "\n", "\n\n", "x", "x\n", "x\n\n", "\nx", "\r\n", "a\r\nb\r\n", "a\rb\r", "\r\n\r\n\r",
        marker, f"{marker}\n", f"\n{marker}\n{marker}", f"x = '{marker}'  # {marker}{marker}\n",
        "  \n\t\n \t \n", "trailing   \n", "ünï ✓ 🙂\n🙂\n", "\ufeffbom\n", "\x0cform feed\x0b\n",
        "a" * 5000 + "\n" + " " * 300 + "\n",  # long lines; whitespace-only pieces
        "12345 67890\n", "</s> <s> <unk> <0x0A>\n", "def f():\n    return None\n}\n",
        "def f():\n    return None\n}\n",  # a whole document twice, and lines shared with others
    ]


def _assert_stream_equals_reference(tokenizer: SentencePieceTokenizer, texts: list[str]) -> None:
    expected = _reference_stream(tokenizer, texts)
    for dtype in (np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.int64)):
        stream = tokenizer.encode_stream(texts, dtype)
        assert stream.dtype == dtype
        assert stream.tolist() == expected
    assert tokenizer.encode_many(texts) == [tokenizer.encode(text) for text in texts]


def test_fast_path_is_the_one_in_use(tokenizer):
    # The pinned SentencePiece has the batch-to-buffer call; a silent fall back to the public
    # path would still be correct but about 25% slower, so it is caught here.
    assert tokenizer._buffer_batch is not None


def test_encode_stream_equals_per_text_encode_on_stdlib_code_and_man_pages(tokenizer):
    code = []
    for path in sorted(STDLIB.glob("*.py"))[:60] + _files_with_every_feature(limit=8):
        try:
            code.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    man = _man_pages(limit=15)
    texts = code + man + _edge_texts()
    random.Random(7).shuffle(texts)
    _assert_stream_equals_reference(tokenizer, texts)
    # every document is also its own call, and each separator sits where a newline was
    for text in _edge_texts() + man[:4]:
        stream = tokenizer.encode_stream([text], np.dtype(np.int32))
        assert stream[-1] == tokenizer.eos_id
        assert int((stream == tokenizer.newline_id).sum()) == text.count("\n")
        assert tokenizer.decode(stream[:-1]) == text


def test_encode_stream_edge_cases_and_the_public_fallback_agree(tokenizer):
    fallback = SentencePieceTokenizer(tokenizer.model_bytes)
    fallback._buffer_batch = None  # as with a SentencePiece without the private buffer call
    texts = _edge_texts() + [(STDLIB / "textwrap.py").read_text(encoding="utf-8")]
    for tok in (tokenizer, fallback):
        _assert_stream_equals_reference(tok, texts)
        for text in texts:  # one text alone, including "" and "\n"
            _assert_stream_equals_reference(tok, [text])
        _assert_stream_equals_reference(tok, [""] * 5)
        assert tok.encode_stream([], np.dtype(np.int32)).size == 0
    ids = tokenizer.encode(f"{NEWLINE_PIECE}\n")  # the literal marker is text, the newline is not
    assert ids.count(tokenizer.newline_id) == 1 and ids[-1] == tokenizer.newline_id
