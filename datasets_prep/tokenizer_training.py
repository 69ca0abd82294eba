"""Training the SentencePiece tokenizer (core.tokenizer encodes and decodes with it).

The settings keep code intact: identity normalisation, no whitespace squashing, no dummy prefix,
byte fallback for anything outside the vocabulary, digits split so numbers do not eat the
vocabulary, and the newline control piece that core.tokenizer joins lines with.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator

from core.tokenizer import BOS_ID, EOS_ID, NEWLINE_PIECE, UNK_ID, SentencePieceTokenizer

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
