"""Held-out text for scoring an export: any prep source (or a plain JSONL file or directory) read,
tokenized with the export's own tokenizer and packed like training samples, grouped by domain.

    batches = packed_batches("jsonl:/data/held_out.jsonl", tokenizer, seq_len=2048, batch_size=8)
    # {"text": [{"tokens": LongTensor [8, 2049], "domains": [...]}, ...], ...}

Documents are joined with EOS and cut into seq_len + 1 token rows exactly as prep does (the short
tail is dropped), so an evaluation scores text the way the model was trained to read it.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from core import shards
from core.tokenizer import SentencePieceTokenizer
from datasets_prep import sources


def source_spec(data: str) -> sources.SourceSpec:
    """A prep source from a source string, or from a bare path: *.jsonl[.gz|.zst] file -> jsonl, dir -> dir."""
    if ":" in data.split("/", 1)[0] and not data.startswith(("s3://", "file://")):
        return sources.parse_source(data)
    if data.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return sources.parse_source(f"jsonl:{data}")
    if data.endswith(".parquet"):
        return sources.parse_source(f"parquet:{data}")
    if data.startswith("s3://") or os.path.isdir(data):
        return sources.parse_source(f"dir:{data}?domain=text")
    raise ValueError(f"{data} is neither a manifest.json, a JSONL/Parquet file, a directory nor a source "
                     "(e.g. jsonl:PATH?text_field=content)")


def packed_batches(data: str, tokenizer: SentencePieceTokenizer, *, seq_len: int, batch_size: int,
                   max_tokens: int = 0) -> dict[str, list[dict]]:
    """Per domain, batches of packed rows [batch_size, seq_len + 1] (the last batch may be smaller)."""
    spec = source_spec(data)
    texts: dict[str, list[str]] = {}
    for item in sources.expand(spec):
        for document in sources.read_item(item):
            texts.setdefault(document.domain, []).append(document.text)
    if not texts:
        raise ValueError(f"{data} holds no documents")
    dtype = shards.token_dtype(tokenizer.vocab_size)
    out: dict[str, list[dict]] = {}
    for domain, documents in sorted(texts.items()):
        stream = tokenizer.encode_stream(documents, dtype)
        rows, _ = shards.pack_stream(stream, seq_len + 1)
        if max_tokens:
            rows = rows[: max(1, -(-max_tokens // seq_len))]
        if not len(rows):
            raise ValueError(f"{data}: the {domain} documents give {stream.size} tokens, less than one row of "
                             f"seq_len + 1 = {seq_len + 1}; give more text")
        tokens = torch.from_numpy(np.ascontiguousarray(rows).astype(np.int64))
        out[domain] = [{"tokens": part, "domains": [domain] * len(part)} for part in tokens.split(batch_size)]
    return out
