"""manifest.json: the single description of a prepared dataset, read by the training loader.

Paths inside the manifest are relative to the manifest's own directory, so a prepared dataset can
be copied between a local disk and a bucket unchanged. The fingerprint covers everything that
decides which token sits at which global sample index; checkpoints store it, so resuming on
different data is detected instead of silently training on a shifted order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from core import storage

FORMAT = "mmrec-shards/1"
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest directory, e.g. "code/train/shard-000003.tar"
    domain: str
    split: str
    samples: int
    tokens: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    seq_len: int
    token_dtype: str
    tokenizer_path: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    shards: tuple[ShardInfo, ...]
    stats: dict = dataclasses.field(default_factory=dict, compare=False)
    format: str = FORMAT

    @property
    def sample_tokens(self) -> int:
        return self.seq_len + 1

    def select(self, domain: str, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.domain == domain and s.split == split]

    @property
    def fingerprint(self) -> str:
        payload = {"format": self.format, "seq_len": self.seq_len,
                   "tokenizer_sha256": self.tokenizer_sha256,
                   "shards": [(s.path, s.samples, s.sha256) for s in self.shards]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["fingerprint"] = self.fingerprint
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> "Manifest":
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} has format {data.get('format')!r}, this code reads "
                             f"{FORMAT!r}: re-run datasets_prep")
        fingerprint = data.pop("fingerprint", None)
        shards = tuple(ShardInfo(**shard) for shard in data.pop("shards"))
        manifest = cls(shards=shards, **data)
        if fingerprint is not None and fingerprint != manifest.fingerprint:
            raise ValueError(f"{source} was edited by hand: its fingerprint does not match its "
                             f"contents; re-run datasets_prep to rebuild it")
        return manifest


def manifest_dir(manifest_url: str) -> str:
    return manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."


def load_manifest(manifest_url: str) -> Manifest:
    return Manifest.from_json(storage.read_bytes(manifest_url).decode(), source=manifest_url)


def save_manifest(manifest: Manifest, manifest_url: str) -> None:
    storage.write_bytes(manifest_url, manifest.to_json().encode())
