"""The dataset's SentencePiece tokenizer: trained with code-safe settings, or brought by the user and
checked for what the packer needs, and stored once per content in the dataset (core.tokenizer
encodes and decodes with it).

The settings keep code intact: identity normalisation, no whitespace squashing, no dummy prefix,
byte fallback for anything outside the vocabulary, digits split so numbers do not eat the
vocabulary, and the newline control piece that core.tokenizer joins lines with.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterable, Iterator

from core import shards as shard_format
from core import storage
from core.config import PrepConfig
from core.tokenizer import BOS_ID, EOS_ID, NEWLINE_PIECE, UNK_ID, SentencePieceTokenizer
from datasets_prep.publish import TOKENIZER_DIR, TOKENIZER_META_NAME, TOKENIZER_NAME, tokenizer_paths

log = logging.getLogger("datasets_prep.pipeline")

# 256 byte pieces + unk/bos/eos + the newline piece must fit, with room for some real merges.
MIN_VOCAB_SIZE = 300


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram",
                    num_threads: int | None = None) -> SentencePieceTokenizer:
    """Train on `texts` (already a sample of the corpus); returns the tokenizer, model in memory."""
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 260 "
                         f"pieces; use at least {MIN_VOCAB_SIZE}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        control_symbols=[NEWLINE_PIECE],
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        # A small sample may not support the requested size; take what it supports instead of
        # failing, and report the real size through vocab_size.
        hard_vocab_limit=False,
        max_sentence_length=16384,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue())


# ---------------------------------------------------------------------------------------------
# Checking a brought tokenizer, finding and storing a trained one

_ROUND_TRIP_PROBES = (
    "def f(x):\n\treturn x  # two  spaces, a tab\n",
    "  leading and trailing spaces  ",
    "ligatures \ufb01 and full-width \uff21\uff22 stay as written",
    "a literal <nl> is text, not a newline",
    "caf\u00e9 \u2603 \U0001d518 \u4e2d\u6587 \x00\x7f",
)


def check_tokenizer_model(model_bytes: bytes, url: str) -> SentencePieceTokenizer:
    """The tokenizer of a SentencePiece model the user brings, if the packer can use it: the
    newline control piece, an EOS id, byte fallback, text given back unchanged. Otherwise a
    ValueError that names every missing piece and how to train a model that has it."""
    import sentencepiece as spm

    how = (f"train one with datasets_prep.train_tokenizer(texts, vocab_size), or pass "
           f"control_symbols=['{NEWLINE_PIECE}'], byte_fallback=True, "
           f"normalization_rule_name='identity', remove_extra_whitespaces=False and eos_id >= 0 to "
           f"spm.SentencePieceTrainer.train ('{NEWLINE_PIECE}' as a control symbol: a "
           f"user_defined_symbols piece would turn a literal '{NEWLINE_PIECE}' in the text into a "
           f"newline)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as exc:  # noqa: BLE001 - SentencePiece raises a bare RuntimeError
        raise ValueError(f"the tokenizer {url} is not a SentencePiece model "
                         f"({str(exc).strip()[:200]}): give the .model file SentencePiece training "
                         f"wrote; {how}") from None
    problems = []
    newline = sp.piece_to_id(NEWLINE_PIECE)
    if sp.get_piece_size() == 0 or sp.id_to_piece(newline) != NEWLINE_PIECE:
        problems.append(f"no {NEWLINE_PIECE!r} control piece (the newline between lines)")
    elif not sp.is_control(newline):
        problems.append(f"{NEWLINE_PIECE!r} is a normal or user-defined piece, not a control "
                        f"piece, so a literal {NEWLINE_PIECE!r} in the text would become a "
                        f"newline")
    if sp.get_piece_size() == 0 or sp.eos_id() < 0:
        problems.append("no end-of-sequence id (it was trained with eos_id=-1)")
    missing_bytes = [b for b in range(256)
                     if sp.get_piece_size() == 0
                     or not sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>"))]
    if missing_bytes:
        problems.append(f"no byte fallback ({len(missing_bytes)} of the 256 byte pieces <0x00>.."
                        f"<0xFF> are missing), so text outside its vocabulary would become <unk>")
    if not problems:
        tokenizer = SentencePieceTokenizer(model_bytes)
        for probe in _ROUND_TRIP_PROBES:
            back = tokenizer.decode(tokenizer.encode(probe))
            if back != probe:
                problems.append(f"it does not give text back unchanged ({probe!r} decodes as "
                                f"{back!r}): it normalises text or squashes whitespace")
                break
    if problems:
        raise ValueError(f"the tokenizer {url} cannot be used to pack this dataset: it has "
                         f"{'; '.join(problems)}. To get one that can, {how}")
    return tokenizer


def byo_tokenizer(config: PrepConfig) -> bytes:
    try:
        model_bytes = storage.read_bytes(config.tokenizer)
    except storage.StorageNotFound:
        raise storage.StorageNotFound(f"the tokenizer {config.tokenizer} (prep.tokenizer) does not "
                                      f"exist: give the path or s3:// URL of a SentencePiece "
                                      f".model file") from None
    tokenizer = check_tokenizer_model(model_bytes, config.tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        log.info("prep: prep.vocab_size=%d is ignored: the tokenizer %s has %d pieces, and the "
                 "dataset uses those", config.vocab_size, config.tokenizer, tokenizer.vocab_size)
    return model_bytes


def train_wanted(config: PrepConfig) -> dict:
    """What decides a trained tokenizer: a stored one trained with the same values is reused."""
    return {"vocab_size": config.vocab_size, "sources": list(config.sources),
            "tokenizer_sample_mb": config.tokenizer_sample_mb}


def find_trained_tokenizer(out: str, files: dict[str, str], wanted: dict) -> bytes | None:
    """A tokenizer stored in the output (published, left by an interrupted run, or at the top of
    a dataset written before versioned tokenizers) that was trained with `wanted` and is intact;
    None when there is none."""
    for relative, url in sorted(files.items()):
        parts = relative.split("/")
        if len(parts) == 3 and parts[0] == TOKENIZER_DIR and parts[2] == TOKENIZER_META_NAME:
            model_path = f"{TOKENIZER_DIR}/{parts[1]}/{TOKENIZER_NAME}"
        elif relative == TOKENIZER_META_NAME:  # the earlier layout: <out>/tokenizer.json
            model_path = TOKENIZER_NAME
        else:
            continue
        try:
            meta = json.loads(storage.read_bytes(url))
            if not isinstance(meta, dict) or meta.get("trained_with") != wanted:
                continue
            model_bytes = storage.read_bytes(storage.join(out, model_path))
        except (storage.StorageNotFound, ValueError, KeyError, TypeError):
            continue  # unreadable metadata or a missing model: not reusable, train afresh
        digest = shard_format.sha256_hex(model_bytes)
        if digest == meta.get("sha256") and (model_path == TOKENIZER_NAME
                                            or parts[1] == digest[:16]):
            return model_bytes
    return None


def write_if_changed(url: str, data: bytes) -> bool:
    try:
        if storage.read_bytes(url) == data:
            return False
    except storage.StorageNotFound:
        pass
    storage.write_bytes(url, data)
    return True


def store_tokenizer(out: str, model_bytes: bytes, origin: dict) -> str:
    """Store the model under its content-addressed path (not rewritten when already there);
    returns that path, relative to `out`."""
    tokenizer = SentencePieceTokenizer(model_bytes)
    model_path, meta_path = tokenizer_paths(tokenizer.sha256)
    write_if_changed(storage.join(out, model_path), model_bytes)
    meta = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, **origin}
    write_if_changed(storage.join(out, meta_path),
                      (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return model_path
