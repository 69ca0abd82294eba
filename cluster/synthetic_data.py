"""A small prepared dataset written without a corpus or a tokenizer run, for tests and benchmarks.

It is a real dataset in the datasets_prep format (WebDataset tar shards + manifest.json, read by
mmrec.data.ShardLoader), only its text is generated: "text" samples are sentences of a fixed word
list and "code" samples are Python-like lines, byte-tokenized (a tokenizer.json of type "byte"
sits beside the manifest, so exports carry a working tokenizer). Content depends only on the seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.manifest import MANIFEST_NAME, Manifest, ShardInfo, save_manifest
from core.shards import sha256_hex, shard_bytes

_WORDS = "the a model learns from data and every token of text follows rules that it can see over time".split()
_CODE = ["def f(x):", "    return x + 1", "for i in range(n):", "    total += i", "if x > 0:", "import os", "class A:", "    pass"]


def _stream(domain: str, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    pieces, total = [], 0
    while total < n_tokens:
        if domain == "text":
            line = " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 10)))) + ". "
        else:
            line = "\n".join(_CODE[i] for i in rng.integers(0, len(_CODE), size=3)) + "\n"
        data = np.frombuffer(line.encode(), dtype=np.uint8)
        pieces.append(data)
        total += len(data)
    return np.concatenate(pieces)[:n_tokens].astype(np.uint16)


def write_synthetic_dataset(
    out: str | Path, *, seq_len: int, train_samples: int = 64, val_samples: int = 8, samples_per_shard: int = 16, seed: int = 0
) -> str:
    """Write text/code x train/val shards under `out`; returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps({"type": "byte"}) + "\n")
    rng = np.random.default_rng(seed)
    shards = []
    for domain in ("code", "text"):
        for split, count in (("train", train_samples), ("val", val_samples)):
            samples = _stream(domain, count * (seq_len + 1), rng).reshape(count, seq_len + 1)
            for number, first in enumerate(range(0, count, samples_per_shard)):
                part = samples[first : first + samples_per_shard]
                name = f"{domain}/{split}/shard-{number:06d}.tar"
                data = shard_bytes(part, domain, first)
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
                shards.append(ShardInfo(path=name, domain=domain, split=split, samples=len(part),
                                        tokens=int(part.size), bytes=len(data), sha256=sha256_hex(data)))
    manifest = Manifest(
        seq_len=seq_len, token_dtype="uint16", tokenizer_path="tokenizer.json",
        tokenizer_sha256=sha256_hex((out / "tokenizer.json").read_bytes()), vocab_size=256, eos_id=10,
        shards=tuple(shards), stats={"synthetic": True},
    )
    path = str(out / MANIFEST_NAME)
    save_manifest(manifest, path)
    return path
