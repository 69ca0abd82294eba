"""manifest.json: the single description of a prepared dataset, read by the training loader.

Paths inside the manifest are relative to the manifest's own directory, so a prepared dataset can
be copied between a local disk and a bucket unchanged. A reader opens only what the manifest names:
prep publishes a new version by writing content-addressed files beside the old ones and then
replacing manifest.json (docs/data.md), so a manifest stays valid until it is replaced. The fingerprint covers everything that
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
    path: str  # relative to the manifest directory, e.g. "code/train/shard-000003-<sha16>.tar"
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

    @property
    def paths(self) -> list[str]:
        """Every file the manifest names (tokenizer first), relative to its directory."""
        return [self.tokenizer_path, *(s.path for s in self.shards)]

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{source} is not valid JSON ({exc}): re-run datasets_prep") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source} holds a JSON {type(data).__name__}, not a manifest object: "
                             f"point at the manifest.json datasets_prep wrote")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} has format {data.get('format')!r}, this code reads "
                             f"{FORMAT!r}: re-run datasets_prep")
        fingerprint = data.pop("fingerprint", None)
        shards = data.pop("shards", None)
        if not isinstance(shards, list):
            raise ValueError(f"{source} has no list of shards: re-run datasets_prep")
        _check_keys(data, cls, {"shards"}, source)
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise ValueError(f"{source}: shard entry {i} is not an object: re-run datasets_prep")
            _check_keys(shard, ShardInfo, set(), f"{source}: shard entry {i}")
        manifest = cls(shards=tuple(ShardInfo(**shard) for shard in shards), **data)
        if fingerprint is not None and fingerprint != manifest.fingerprint:
            raise ValueError(f"{source} was edited by hand: its fingerprint does not match its "
                             f"contents; re-run datasets_prep to rebuild it")
        return manifest


def _check_keys(data: dict, kind, extra: set[str], where: str) -> None:
    fields = {f.name for f in dataclasses.fields(kind)}
    required = {f.name for f in dataclasses.fields(kind)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown = sorted(set(data) - fields - extra)
    missing = sorted(required - set(data) - extra)
    if unknown or missing:
        said = "; ".join(part for part in (f"unknown keys {unknown}" if unknown else "",
                                           f"missing keys {missing}" if missing else "") if part)
        raise ValueError(f"{where} has {said}: it was not written by this datasets_prep; re-run it")


def manifest_dir(manifest_url: str) -> str:
    return manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."


def load_manifest(manifest_url: str) -> Manifest:
    return Manifest.from_json(storage.read_bytes(manifest_url).decode(), source=manifest_url)


def save_manifest(manifest: Manifest, manifest_url: str) -> None:
    storage.write_bytes(manifest_url, manifest.to_json().encode())


class TokenizerMismatchError(ValueError):
    """The tokenizer a manifest names is missing, or is not the one the dataset was cut with."""


def tokenizer_url(manifest_url: str, manifest: Manifest) -> str:
    return storage.join(manifest_dir(manifest_url), manifest.tokenizer_path)


def read_tokenizer_bytes(manifest_url: str, manifest: Manifest | None = None) -> bytes:
    """The bytes of the tokenizer file a manifest names, checked against its tokenizer_sha256.

    Works for any tokenizer file (SentencePiece model or a byte tokenizer's JSON); raises
    TokenizerMismatchError naming both hashes when the file was replaced or damaged since prep.
    """
    manifest = manifest or load_manifest(manifest_url)
    url = tokenizer_url(manifest_url, manifest)
    try:
        data = storage.read_bytes(url)
    except storage.StorageNotFound:
        raise TokenizerMismatchError(f"the tokenizer {url} named by {manifest_url} does not exist: "
                                     f"the dataset is incomplete; re-run datasets_prep into "
                                     f"{manifest_dir(manifest_url)}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.tokenizer_sha256:
        raise TokenizerMismatchError(
            f"the tokenizer {url} has sha256 {actual[:16]}..., but {manifest_url} was prepared with "
            f"{manifest.tokenizer_sha256[:16]}...: the file was replaced or damaged after prep, and "
            f"training on it would pair the tokens with the wrong pieces; restore the tokenizer the "
            f"dataset was prepared with, or re-run datasets_prep into {manifest_dir(manifest_url)}")
    return data


def load_manifest_tokenizer(manifest_url: str, manifest: Manifest | None = None):
    """The SentencePiece tokenizer of a prepared dataset, verified: its sha256 is the manifest's
    tokenizer_sha256, and its vocabulary size and EOS id are the manifest's."""
    from core.tokenizer import SentencePieceTokenizer

    manifest = manifest or load_manifest(manifest_url)
    data = read_tokenizer_bytes(manifest_url, manifest)
    try:
        tokenizer = SentencePieceTokenizer(data)
    except (RuntimeError, ValueError) as exc:
        raise TokenizerMismatchError(f"the tokenizer {tokenizer_url(manifest_url, manifest)} of "
                                     f"{manifest_url} does not load as a SentencePiece model: "
                                     f"{exc}") from None
    if (tokenizer.vocab_size, tokenizer.eos_id) != (manifest.vocab_size, manifest.eos_id):
        raise TokenizerMismatchError(
            f"{manifest_url} says vocab_size={manifest.vocab_size}, eos_id={manifest.eos_id}, but "
            f"its tokenizer has {tokenizer.vocab_size} pieces and eos_id={tokenizer.eos_id}: the "
            f"manifest was not written for this tokenizer; re-run datasets_prep")
    return tokenizer
