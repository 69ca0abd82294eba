"""A small prepared dataset for tests, written without Ray: real shards, manifest and tokenizer.

It is a real dataset in the datasets_prep format (WebDataset tar shards + manifest.json + a
SentencePiece tokenizer.model trained on the same text with the project's own settings), read by
mmrec.data.ShardLoader like any other; only the text is generated: "text" samples are sentences of
a fixed word list, "code" samples Python-like lines. Content depends only on the seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.manifest import MANIFEST_NAME, Manifest, ShardInfo, save_manifest
from core.shards import sha256_hex, shard_bytes, token_dtype
from core.tokenizer import TOKENIZER_FILE
from datasets_prep.tokenizer_training import train_tokenizer

_WORDS = "the a model learns from data and every token of text follows rules that it can see over time".split()
_CODE = ["def f(x):", "    return x + 1", "for i in range(n):", "    total += i", "if x > 0:", "import os",
         "class A:", "    pass"]


def _documents(domain: str, count: int, rng: np.random.Generator) -> list[str]:
    docs = []
    for _ in range(count):
        if domain == "text":
            docs.append(" ".join(" ".join(rng.choice(_WORDS, size=int(rng.integers(4, 10)))) + "."
                                 for _ in range(int(rng.integers(2, 6)))))
        else:
            docs.append("\n".join(_CODE[i] for i in rng.integers(0, len(_CODE), size=int(rng.integers(3, 9)))) + "\n")
    return docs


def write_synthetic_dataset(out: str | Path, *, seq_len: int, train_samples: int = 64, val_samples: int = 8,
                            samples_per_shard: int = 16, seed: int = 0, vocab_size: int = 320) -> str:
    """Write text/code x train/val shards with their tokenizer under `out`; returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = {domain: _documents(domain, 400, rng) for domain in ("code", "text")}
    tokenizer = train_tokenizer(corpus["code"] + corpus["text"], vocab_size, num_threads=1)
    (out / TOKENIZER_FILE).write_bytes(tokenizer.model_bytes)
    dtype = token_dtype(tokenizer.vocab_size)
    shards = []
    for domain in ("code", "text"):
        stream = tokenizer.encode_stream(corpus[domain], dtype)
        while stream.size < (train_samples + val_samples) * (seq_len + 1):  # repeat the documents until full
            stream = np.concatenate([stream, stream])
        samples = stream[: (train_samples + val_samples) * (seq_len + 1)].reshape(-1, seq_len + 1)
        for split, part in (("train", samples[:train_samples]), ("val", samples[train_samples:])):
            for number, first in enumerate(range(0, len(part), samples_per_shard)):
                rows = part[first:first + samples_per_shard]
                name = f"{domain}/{split}/shard-{number:06d}.tar"
                data = shard_bytes(rows, domain, first)
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
                shards.append(ShardInfo(path=name, domain=domain, split=split, samples=len(rows),
                                        tokens=int(rows.size), bytes=len(data), sha256=sha256_hex(data)))
    manifest = Manifest(
        seq_len=seq_len, token_dtype=dtype.name, tokenizer_path=TOKENIZER_FILE, tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, shards=tuple(shards), stats={"synthetic": True},
    )
    path = str(out / MANIFEST_NAME)
    save_manifest(manifest, path)
    return path
