"""Fixtures for the data tests: a real local Ray instance, one dataset prepared through it onto
the real S3 server (s3_server / s3_env from tests/conftest.py), and small synthetic datasets for
the loader's order tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import storage
from core.manifest import Manifest, ShardInfo, save_manifest
from core.shards import sha256_hex, shard_bytes

# The S3 server and s3_env are suite-wide fixtures (tests/conftest.py): one SeaweedFS server on
# loopback for every S3 test, its bucket `corpora` created at start.
BUCKET = "corpora"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a fresh instance of our own, never a cluster another process started
        # on this machine (ray.init() alone would join the latest one found in /tmp/ray).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


PREP_OPTIONS = dict(vocab_size=400, seq_len=32, shard_mb=0.05, partition_mb=0.2,
                    tokenizer_sample_mb=0.15, val_fraction=0.1, progress=False)
DEMO_SOURCE = "demo?max_mb=0.6"


@pytest.fixture(scope="session")
def prepared_s3(s3_env, ray_local):
    """The demo corpus prepared once, through real Ray, onto the real S3 server."""
    from datasets_prep import prepare

    manifest_url = prepare(DEMO_SOURCE, out=f"s3://{BUCKET}/demo", **PREP_OPTIONS)
    return manifest_url


# ---------------------------------------------------------------------------------------------
# Synthetic datasets whose every token says which sample it is: (domain id, sample index).

DOMAIN_IDS = {"text": 1, "code": 2}


def write_labelled_dataset(root: Path, samples_per_shard: dict[str, list[int]],
                           seq_len: int = 4) -> str:
    """Shards whose sample j of domain d holds [DOMAIN_IDS[d], j, j, ...]; returns manifest path."""
    infos = []
    for domain, sizes in sorted(samples_per_shard.items()):
        first = 0
        for number, size in enumerate(sizes):
            rows = np.zeros((size, seq_len + 1), dtype=np.int32)
            rows[:, 0] = DOMAIN_IDS[domain]
            rows[:, 1:] = np.arange(first, first + size)[:, None]
            data = shard_bytes(rows, domain, first)
            path = f"{domain}/train/shard-{number:06d}.tar"
            storage.write_bytes(str(root / path), data)
            infos.append(ShardInfo(path=path, domain=domain, split="train", samples=size,
                                   tokens=rows.size, bytes=len(data), sha256=sha256_hex(data)))
            first += size
    manifest = Manifest(seq_len=seq_len, token_dtype="int32", tokenizer_path="tokenizer.model",
                        tokenizer_sha256="0" * 64, vocab_size=1 << 20, eos_id=2,
                        shards=tuple(infos))
    url = str(root / "manifest.json")
    save_manifest(manifest, url)
    return url


@pytest.fixture
def labelled_dataset(tmp_path):
    """make(samples_per_shard, seq_len=4) -> manifest path of a fresh labelled dataset."""
    made = []

    def make(sizes, seq_len=4):
        made.append(tmp_path / f"dataset{len(made)}")
        return write_labelled_dataset(made[-1], sizes, seq_len)

    return make


@pytest.fixture(scope="session")
def prep_args():
    """(source, options) that prepared_s3 used: re-running with them must change nothing."""
    return DEMO_SOURCE, dict(PREP_OPTIONS)
