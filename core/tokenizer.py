"""SentencePiece tokenizer that gives code back byte for byte.

SentencePiece treats its input as one line: a newline inside text would either split training
sentences or fall back to a byte piece with no learned merges around it. So newlines are handled
outside SentencePiece: text is split on "\\n", each line is encoded on its own, and the lines are
joined with the id of a reserved control piece NEWLINE_PIECE. A control piece can never be produced
from raw text, so a file that literally contains "<nl>" still round-trips. The settings that keep
code intact at training time are in datasets_prep.tokenizer_training.

Prep encodes with it, the export ships its model file (tokenizer.model), and generate/eval decode
with it: one class, so the newline convention cannot differ between them.
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Iterable

import numpy as np

from core import storage

NEWLINE_PIECE = "<nl>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    """encode(str) -> list[int] and decode(list[int]) -> str, exact for any valid UTF-8 text."""

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.newline_id = self._sp.piece_to_id(NEWLINE_PIECE)
        if self._sp.id_to_piece(self.newline_id) != NEWLINE_PIECE:
            raise ValueError(f"this SentencePiece model has no {NEWLINE_PIECE!r} control piece: "
                             f"train it with datasets_prep.train_tokenizer")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()
        self.vocab_size = self._sp.get_piece_size()

    @classmethod
    def from_url(cls, url: str, expected_sha256: str | None = None) -> "SentencePieceTokenizer":
        """Load tokenizer.model from a path, file:// or s3:// URL; verify its hash when given."""
        tokenizer = cls(storage.read_bytes(url))
        if expected_sha256 is not None and tokenizer.sha256 != expected_sha256:
            raise ValueError(f"tokenizer {url} has sha256 {tokenizer.sha256[:12]}..., the manifest "
                             f"expects {expected_sha256[:12]}...: it was overwritten; re-run prep")
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """One text, plainly: the reference that encode_stream/encode_many are tested against."""
        lines = text.split("\n")
        encoded = self._sp.encode(lines)
        ids: list[int] = list(encoded[0])
        for line_ids in encoded[1:]:
            ids.append(self.newline_id)
            ids.extend(line_ids)
        return ids

    def encode_many(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Batch form of encode: one SentencePiece call for all lines of all texts."""
        stream, starts = self._encode_with_separators(texts, -1, np.dtype(np.int64), num_threads)
        return [stream[start:end - 1].tolist() for start, end in zip(starts[:-1], starts[1:])]

    def encode_stream(self, texts: list[str], dtype: np.dtype, num_threads: int = 1) -> np.ndarray:
        """All texts encoded into one array [sum(len(encode(t)) + 1)], each text followed by EOS:
        the packing stream, built without a Python list per document."""
        return self._encode_with_separators(texts, self.eos_id, dtype, num_threads)[0]

    def _encode_with_separators(self, texts: list[str], end_id: int, dtype: np.dtype,
                                num_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream, starts): every line's ids followed by a separator, which is the newline id
        inside a text and `end_id` after its last line; starts [len(texts) + 1] are offsets."""
        if not texts:
            return np.empty(0, dtype=dtype), np.zeros(1, dtype=np.int64)
        lines_per_text = np.fromiter((text.count("\n") + 1 for text in texts), np.int64,
                                     count=len(texts))
        lines = "\n".join(texts).split("\n")  # same lines as splitting each text, one call
        # Per-line overhead dominates SentencePiece here, and code repeats lines (blank ones,
        # "}", "return None"), so each distinct line is encoded once and its ids gathered back.
        distinct: dict[str, int] = {}
        line_to_distinct = np.fromiter((distinct.setdefault(line, len(distinct)) for line in lines),
                                       np.int64, count=len(lines))
        encoded = self._sp.encode(list(distinct), num_threads=num_threads)
        distinct_lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
        distinct_ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype,
                                   count=int(distinct_lengths.sum()))
        distinct_starts = np.cumsum(distinct_lengths) - distinct_lengths
        line_lengths = distinct_lengths[line_to_distinct]  # [lines]
        # flat [sum(line_lengths)]: every line's ids back to back; token j of line i comes from
        # distinct_ids[distinct_starts[line_to_distinct[i]] + j]
        line_starts = np.cumsum(line_lengths) - line_lengths
        source = np.arange(int(line_lengths.sum())) + np.repeat(
            distinct_starts[line_to_distinct] - line_starts, line_lengths)
        flat = distinct_ids[source]
        # line i occupies [offset_i, offset_i + len_i) and its separator sits at offset_i + len_i
        separator_at = np.cumsum(line_lengths + 1) - 1
        stream = np.empty(flat.size + len(lines), dtype=dtype)
        is_separator = np.zeros(stream.size, dtype=bool)
        is_separator[separator_at] = True
        stream[~is_separator] = flat
        separators = np.full(len(lines), self.newline_id, dtype=dtype)
        last_line = np.cumsum(lines_per_text) - 1
        separators[last_line] = end_id
        stream[separator_at] = separators
        starts = np.zeros(len(texts) + 1, dtype=np.int64)
        starts[1:] = separator_at[last_line] + 1
        return stream, starts

    def decode(self, ids: Iterable[int]) -> str:
        lines: list[list[int]] = [[]]
        for token in ids:
            token = int(token)
            if token == self.newline_id:
                lines.append([])
            else:
                lines[-1].append(token)
        return "\n".join(self._sp.decode(lines))

    def id_to_piece(self, token: int) -> str:
        return self._sp.id_to_piece(int(token))


def load_tokenizer(directory: str | Path) -> SentencePieceTokenizer:
    """The tokenizer stored beside a weights export (its tokenizer.model)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} beside the export in {directory}: copy the tokenizer the model was "
            "trained with (the dataset's tokenizer.model) into that directory"
        )
    return SentencePieceTokenizer(path.read_bytes())
