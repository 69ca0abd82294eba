"""core.shards.read_shard (the direct tar walk) against read_shard_tarfile (tarfile + np.load), the
reference: the same samples from fresh random shards, and a CorruptShardError from both on damage."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from core.shards import CorruptShardError, read_shard, read_shard_tarfile, sha256_hex, shard_bytes

READERS = (read_shard, read_shard_tarfile)


def _shard(rng, samples: int, tokens: int, dtype) -> bytes:
    high = np.iinfo(dtype).max
    return shard_bytes(rng.integers(0, high, size=(samples, tokens), dtype=dtype), "text", int(rng.integers(0, 10**6)))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("samples,tokens", [(0, 65), (1, 1), (7, 65), (300, 129)])
def test_direct_walk_reads_what_tarfile_reads(dtype, samples, tokens):
    rng = np.random.default_rng()
    data = _shard(rng, samples, tokens, dtype)
    kwargs = dict(name="s.tar", expected_sha256=sha256_hex(data), expected_samples=samples, sample_tokens=tokens)
    fast, reference = read_shard(data, **kwargs), read_shard_tarfile(data, **kwargs)
    assert fast.shape == reference.shape == (samples, tokens)
    assert fast.dtype == reference.dtype
    np.testing.assert_array_equal(fast, reference)
    assert fast.flags.writeable and fast.flags.c_contiguous  # a copy, not a view into the shard's bytes


def _damaged(data: bytes, how: str) -> bytes:
    if how == "cut inside a payload":
        return data[: 512 + 100]
    if how == "cut inside a header":
        return data[: 4 * 512 + 200]  # the third header starts at 2048: sample 0 (2 blocks), its .json (2)
    if how == "header byte flipped":
        return data[:10] + bytes([data[10] ^ 0x5A]) + data[11:]
    if how == "size field says more than there is":
        header = bytearray(data[:512])
        header[124:136] = b"77777777777\0"
        header[148:156] = b"        "
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        return bytes(header) + data[512:]
    if how == "npy header damaged":
        return data[:512] + b"\x00NOTNPY" + data[512 + 7:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["cut inside a payload", "cut inside a header", "header byte flipped",
                                 "size field says more than there is", "npy header damaged"])
@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_damage_is_a_corrupt_shard_error_without_the_checksum(reader, how):
    data = _damaged(_shard(np.random.default_rng(), 5, 65, np.uint16), how)
    with pytest.raises(CorruptShardError, match="shard s.tar"):
        reader(data, name="s.tar", expected_sha256=None, expected_samples=5, sample_tokens=65)


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_wrong_count_or_length_is_named(reader):
    data = _shard(np.random.default_rng(), 5, 65, np.uint16)
    with pytest.raises(CorruptShardError, match="holds 5 samples, the manifest says 6"):
        reader(data, name="s.tar", expected_sha256=None, expected_samples=6, sample_tokens=65)
    with pytest.raises(CorruptShardError, match="s.tar"):
        reader(data, name="s.tar", expected_sha256=None, expected_samples=5, sample_tokens=64)


def test_a_flipped_token_is_caught_by_the_checksum_only():
    data = _shard(np.random.default_rng(), 5, 65, np.uint16)
    flipped = data[:512 + 128] + bytes([data[512 + 128] ^ 1]) + data[512 + 129:]  # first token of the first row
    rows = read_shard(flipped, name="s.tar", expected_sha256=None, expected_samples=5, sample_tokens=65)
    assert rows[0, 0] != read_shard(data, name="s.tar", expected_sha256=None, expected_samples=5, sample_tokens=65)[0, 0]
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        read_shard(flipped, name="s.tar", expected_sha256=sha256_hex(data), expected_samples=5, sample_tokens=65)


def test_an_extension_header_shard_bytes_never_writes_is_refused_by_name():
    """A pax archive (what tarfile writes for a member name over 100 bytes) is not a shard: the
    direct walk says which member type it met instead of misreading the extension header."""
    out = io.BytesIO()
    payload = io.BytesIO()
    np.save(payload, np.arange(65, dtype=np.uint16))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x" * 120 + ".tokens.npy")
        info.size = len(payload.getvalue())
        tar.addfile(info, io.BytesIO(payload.getvalue()))
    with pytest.raises(CorruptShardError, match="member type b'x'"):
        read_shard(out.getvalue(), name="s.tar", expected_sha256=None, expected_samples=1, sample_tokens=65)
