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
        self._buffer_batch = self._find_buffer_batch()

    def _find_buffer_batch(self):
        """SentencePiece's batch call that returns one int32 buffer per input (the fast path of
        _encode_lines; private in sentencepiece 0.2.3, behind its encode(out_type="numpy")), if it
        is there and gives what the public encode gives, EOS appended; else None (public path)."""
        batch = getattr(getattr(self._sp, "_processor", None), "_EncodeAsBufferBatch", None)
        if batch is None or self.eos_id < 0:
            return None
        probe = ["def f(x):", "", "\treturn x  # ünï ✓ 🙂 12 </s>"]
        try:
            got = [np.frombuffer(b, dtype=np.int32).tolist()
                   for b in batch(probe, 1, None, False, 0, 0.0, False, True, False)]
        except Exception:  # noqa: BLE001 - another SentencePiece version: other arguments
            return None
        return batch if got == [ids + [self.eos_id] for ids in self._sp.encode(probe)] else None

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
        inside a text and `end_id` after its last line; starts [len(texts) + 1] are offsets.

        The same ids as encode() on each text, at about SentencePiece's own rate. SentencePiece
        still encodes every line as an input of its own: joined lines would break ties between
        equal-score segmentations differently (its Viterbi sums float32 scores along the whole
        input), which changed 27 of 453 demo documents. What is cut is the work around that call.
        """
        if not texts:
            return np.empty(0, dtype=dtype), np.zeros(1, dtype=np.int64)
        lines_of_text = list(map(str.split, texts, itertools.repeat("\n")))
        lines_per_text = np.fromiter(map(len, lines_of_text), np.int64, count=len(texts))
        n_lines = int(lines_per_text.sum())
        # Per-line overhead dominates SentencePiece here, and code repeats lines (blank ones,
        # "}", "return None"), so each distinct line is encoded once and its ids gathered back.
        # One C-level pass, no Python bytecode per line: setdefault gives every line the index of
        # its first occurrence, and the dict's keys are the distinct lines in that order.
        first_index: dict[str, int] = {}
        line_first = np.fromiter(map(first_index.setdefault,
                                     itertools.chain.from_iterable(lines_of_text),
                                     itertools.count()), np.int64, count=n_lines)
        del lines_of_text
        rank = np.empty(n_lines, dtype=np.int64)
        rank[np.fromiter(first_index.values(), np.int64, count=len(first_index))] = \
            np.arange(len(first_index))
        line_to_distinct = rank[line_first]  # [lines]
        # [sum(len(ids) + 1) over distinct lines]: each distinct line's ids and one free slot
        distinct_ids, distinct_ends = self._encode_lines(list(first_index), dtype, num_threads)
        del first_index
        segment = np.diff(distinct_ends, prepend=0)  # ids + separator slot, per distinct line
        distinct_starts = distinct_ends - segment
        line_segment = segment[line_to_distinct]  # [lines]
        line_ends = np.cumsum(line_segment)
        # slot j of line i comes from distinct_ids[distinct_starts[line_to_distinct[i]] + j]
        source = np.arange(int(line_ends[-1]))
        source += np.repeat(distinct_starts[line_to_distinct] - (line_ends - line_segment),
                            line_segment)
        stream = distinct_ids[source]
        separator_at = line_ends - 1
        stream[separator_at] = self.newline_id
        last_line = np.cumsum(lines_per_text) - 1
        stream[separator_at[last_line]] = end_id
        starts = np.zeros(len(texts) + 1, dtype=np.int64)
        starts[1:] = line_ends[last_line]
        return stream, starts

    def _encode_lines(self, lines: list[str], dtype: np.dtype,
                      num_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ends): newline-free lines encoded back to back, each followed by one slot for a
        separator; line k's ids are ids[ends[k - 1]:ends[k] - 1] (ends[-1] = ids.size)."""
        if self._buffer_batch is not None:
            # One batch call with add_eos: one int32 buffer per line, EOS last. EOS is a control
            # piece that no text encodes to, so the EOS positions are the line ends; one
            # bytes.join makes them one array, with no Python int per token (the public encode
            # builds a list of ints per line, or one numpy array per line).
            buffers = self._buffer_batch(lines, num_threads, None, False, 0, 0.0, False, True,
                                         False)
            flat = np.frombuffer(b"".join(buffers), dtype=np.int32)
            del buffers
            ends = np.flatnonzero(flat == self.eos_id)
            ends += 1
            return flat.astype(dtype), ends
        encoded = self._sp.encode(lines, num_threads=num_threads)  # any other SentencePiece
        ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, count=len(encoded)) + 1)
        flat = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=dtype)
        is_id = np.ones(flat.size, dtype=bool)
        is_id[ends - 1] = False
        flat[is_id] = np.fromiter(itertools.chain.from_iterable(encoded), dtype,
                                  count=flat.size - len(ends))
        return flat, ends

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
