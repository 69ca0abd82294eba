"""The shard format: documents packed into fixed samples, stored as WebDataset tar files.

A shard is a POSIX tar whose members come in pairs per sample, the WebDataset convention:
    {key}.tokens.npy   int array [seq_len + 1]
    {key}.json         {"domain": ..., "index": i}
Tar headers carry fixed mtime/uid/gid/mode so the same samples always give the same bytes and
the same sha256: that is what makes re-running prep idempotent and checksums meaningful.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np

SPLITS = ("train", "val")


class CorruptShardError(ValueError):
    """A shard whose bytes do not match the manifest or do not parse as a shard."""


def split_of(text: str, val_fraction: float) -> str:
    """'train' or 'val' from a hash of the document itself: stable across runs and partitionings."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def pack(documents: list[list[int]], eos_id: int, sample_tokens: int,
         dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, and cut into rows of `sample_tokens`.

    Returns (samples [n, sample_tokens], dropped_tokens): the tail shorter than one sample is
    dropped rather than padded, so every token a model sees is real text.
    """
    total = sum(len(doc) + 1 for doc in documents)
    stream = np.empty(total, dtype=dtype)
    cursor = 0
    for doc in documents:
        stream[cursor:cursor + len(doc)] = doc
        stream[cursor + len(doc)] = eos_id
        cursor += len(doc) + 1
    return pack_stream(stream, sample_tokens)


def pack_stream(stream: np.ndarray, sample_tokens: int) -> tuple[np.ndarray, int]:
    """Cut a stream of EOS-terminated documents [total] into samples [n, sample_tokens] (a view);
    returns (samples, dropped_tokens) with the short tail dropped, as pack() does."""
    n = stream.size // sample_tokens
    return stream[:n * sample_tokens].reshape(n, sample_tokens), stream.size - n * sample_tokens


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def shard_bytes(samples: np.ndarray, domain: str, first_index: int) -> bytes:
    """Serialise samples [n, sample_tokens] into a deterministic tar. Keys are global per stream."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, sample in enumerate(samples):
            key = f"{domain}-{first_index + row:010d}"
            array = io.BytesIO()
            np.save(array, np.ascontiguousarray(sample), allow_pickle=False)
            _member(tar, f"{key}.tokens.npy", array.getvalue())
            meta = json.dumps({"domain": domain, "index": first_index + row}, sort_keys=True)
            _member(tar, f"{key}.json", meta.encode())
    return out.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_shard(data: bytes, *, name: str, expected_sha256: str | None, expected_samples: int,
               sample_tokens: int) -> np.ndarray:
    """Verify and decode a shard into samples [n, sample_tokens]; CorruptShardError on any mismatch."""
    if expected_sha256 is not None:
        actual = sha256_hex(data)
        if actual != expected_sha256:
            raise CorruptShardError(f"shard {name} fails its checksum (sha256 {actual[:12]}..., "
                                    f"manifest says {expected_sha256[:12]}...; {len(data)} bytes)")
    rows = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name.endswith(".tokens.npy"):
                    payload = tar.extractfile(member).read()
                    rows.append(np.load(io.BytesIO(payload), allow_pickle=False))
    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
        raise CorruptShardError(f"shard {name} does not parse as a tar of samples: {exc}") from None
    if len(rows) != expected_samples or any(row.shape != (sample_tokens,) for row in rows):
        raise CorruptShardError(f"shard {name} holds {len(rows)} samples, the manifest says "
                                f"{expected_samples} of {sample_tokens} tokens")
    return np.stack(rows) if rows else np.empty((0, sample_tokens), dtype=np.int64)
