"""The Tokenizer protocol used by generate and the smoke job, a byte-level implementation, and the
loader that finds the tokenizer stored beside a weights export.

A tokenizer lives in an export directory as either `tokenizer.json` ({"type": "byte"}) or a
SentencePiece `tokenizer.model`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no training, no unknown tokens, any text round-trips."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model with a larger vocabulary can sample ids >= 256, which are no byte: drop them.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.write_text(json.dumps({"type": "byte"}) + "\n")
        return path


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer stored in `directory` (an export directory)."""
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        from core.tokenizer import SentencePieceTokenizer  # the data pipeline's tokenizer (byte-exact for code)

        return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    spec_path = directory / "tokenizer.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        if spec.get("type") == "byte":
            return ByteTokenizer()
        raise ValueError(f"{spec_path}: unknown tokenizer type {spec.get('type')!r} (known: 'byte')")
    raise FileNotFoundError(
        f"no tokenizer beside the export in {directory}: expected tokenizer.model (SentencePiece) or "
        "tokenizer.json; copy the tokenizer used for training into that directory"
    )
