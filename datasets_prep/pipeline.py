"""prepare(): sources -> tokenizer -> packed shards -> manifest.json, as Ray tasks.

Three waves of tasks, each followed by a progress bar:
  1. sample   one task per partition returns a slice of its text for tokenizer training;
  2. encode   one task per partition tokenizes, splits train/val and packs samples
              (the tokenizer model travels once through the object store);
  3. write    one task per shard serialises its samples and uploads them, unless an identical
              shard (same sha256) is already there.
The driver only moves counts and object references, never token arrays. Shard boundaries are
planned from the counts in partition order, so names and contents depend only on the inputs.
Ray is imported inside functions: the training loader imports this package and must not pull Ray.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Sequence

import numpy as np

from core import shards as shard_format
from datasets_prep import sources as source_lib
from core import storage
from core.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest, \
    save_manifest
from core.tokenizer import SentencePieceTokenizer
from datasets_prep.tokenizer_training import MIN_VOCAB_SIZE, train_tokenizer

TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_META_NAME = "tokenizer.json"
# Per-sample overhead inside a tar: two 512-byte headers, padding of two members, npy header, json.
_TAR_OVERHEAD_PER_SAMPLE = 2 * 512 + 2 * 256 + 128 + 64


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    out: str
    sources: tuple[str, ...] = ("demo",)
    vocab_size: int = 32000
    seq_len: int = 2048
    val_fraction: float = 0.01
    shard_mb: float = 64.0
    partition_mb: float = 16.0
    tokenizer_sample_mb: float = 16.0
    progress: bool = True

    def __post_init__(self):
        if not self.out:
            raise ValueError("out must be a path or s3:// URL for the prepared dataset")
        if not self.sources:
            raise ValueError("give at least one source, e.g. 'demo' or 'dir:/data?domain=text'")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: byte fallback alone "
                             f"needs 260 pieces; use at least {MIN_VOCAB_SIZE}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("shard_mb", "partition_mb", "tokenizer_sample_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def prepare(source: str | Sequence[str] = "demo", out: str = "runs/data", *,
            vocab_size: int = 32000, seq_len: int = 2048, **options) -> str:
    """Prepare a dataset with Ray tasks on the local or connected cluster; returns the manifest URL.

    Options (unknown ones are errors naming the key): val_fraction, shard_mb, partition_mb,
    tokenizer_sample_mb, progress.
    """
    allowed = {f.name for f in dataclasses.fields(PrepConfig)} - {"out", "sources"}
    for key in options:
        if key not in allowed:
            raise TypeError(f"prepare() got an unknown option {key!r}; allowed: {sorted(allowed)}")
    sources = (source,) if isinstance(source, str) else tuple(source)
    config = PrepConfig(out=out.rstrip("/"), sources=sources, vocab_size=vocab_size,
                        seq_len=seq_len, **options)
    return run_prep(config)


# ---------------------------------------------------------------------------------------------
# Task bodies (plain functions; wrapped as Ray tasks in run_prep)


def _sample_partition(settings: storage.S3Settings, items: list[source_lib.Item],
                      budget: int) -> list[str]:
    storage.use_s3_settings(settings)
    texts, used = [], 0
    for item in items:
        for doc in source_lib.read_item(item):
            take = doc.text[: max(0, budget - used)]
            if take:
                texts.append(take)
                used += len(take)
        if used >= budget:
            break
    return texts


def _train_tokenizer(texts_per_partition: list[list[str]], vocab_size: int,
                     sources: tuple[str, ...]) -> bytes:
    texts = [text for texts in texts_per_partition for text in texts]
    if not any(text.strip() for text in texts):
        raise ValueError(f"the sources {list(sources)} hold no UTF-8 text to train a tokenizer on "
                         f"(empty or binary files only): check the paths and globs")
    try:
        return train_tokenizer(texts, vocab_size, num_threads=1).model_bytes
    except RuntimeError as exc:  # SentencePiece reports bad settings as a bare RuntimeError
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this "
                         f"corpus: {str(exc).strip()}; try another vocab_size or more "
                         f"tokenizer_sample_mb") from None


def _encode_partition(settings: storage.S3Settings, model_bytes: bytes,
                      items: list[source_lib.Item], seq_len: int, val_fraction: float):
    """Returns (counts, samples): counts is small and goes to the driver; samples stays in Ray."""
    storage.use_s3_settings(settings)
    tokenizer = SentencePieceTokenizer(model_bytes)
    dtype = shard_format.token_dtype(tokenizer.vocab_size)
    grouped: dict[tuple[str, str], list[str]] = {}
    stats = {"documents": 0, "unreadable_files": 0}
    for item in items:
        documents = list(source_lib.read_item(item))
        stats["unreadable_files"] += not documents
        for doc in documents:
            key = (doc.domain, shard_format.split_of(doc.text, val_fraction))
            grouped.setdefault(key, []).append(doc.text)
            stats["documents"] += 1
    samples, counts = {}, {}
    stats["dropped_tokens"] = 0
    train_tokens = 0  # with EOS; only for the error when no sample fills (not a manifest stat)
    stats["document_tokens"] = 0
    for key in sorted(grouped):
        stream = tokenizer.encode_stream(grouped[key], dtype)
        stats["document_tokens"] += stream.size - len(grouped[key])  # minus one EOS per document
        train_tokens += stream.size if key[1] == "train" else 0
        packed, dropped = shard_format.pack_stream(stream, seq_len + 1)
        samples[key] = packed
        counts[key] = len(packed)
        stats["dropped_tokens"] += dropped
    return {"counts": counts, "stats": stats, "train_tokens": train_tokens}, samples


def _write_shard(settings: storage.S3Settings, url: str, domain: str, split: str,
                 first_index: int, slices: list[tuple[int, int, int]], *partition_samples) -> dict:
    """Build one shard from slices (partition, start, end) of (domain, split) samples; upload it
    unless an object with the same sha256 is already there."""
    storage.use_s3_settings(settings)
    rows = [partition_samples[p][(domain, split)][start:end] for p, start, end in slices]
    samples = np.concatenate(rows)
    data = shard_format.shard_bytes(samples, domain, first_index)
    digest = shard_format.sha256_hex(data)
    written = True
    try:
        if shard_format.sha256_hex(storage.read_bytes(url)) == digest:
            written = False
    except storage.StorageNotFound:
        pass
    if written:
        storage.write_bytes(url, data)
    return {"samples": len(samples), "tokens": int(samples.size), "bytes": len(data),
            "sha256": digest, "written": written}


# ---------------------------------------------------------------------------------------------
# Driver


def _get(ray, ref):
    """ray.get, but a user-fixable error raised inside a task (bad record, missing bucket) comes
    back as itself, with its own message, instead of wrapped in the remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (ValueError, storage.StorageError)):
            raise exc.cause from None
        raise


def _wait_all(ray, refs: list, description: str, progress: bool) -> list:
    """ray.get in completion order with a progress bar; results in submission order."""
    from tqdm import tqdm

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=description, unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = _get(ray, ref)
                bar.update(1)
    return results


def _connect_ray():
    import ray

    if not ray.is_initialized():
        # No runtime_env and no address: connects to RAY_ADDRESS when set (also inside a
        # `ray job submit` job), otherwise starts a local instance.
        ray.init()
    return ray


def _load_or_train_tokenizer(ray, config: PrepConfig, settings, partitions) -> bytes:
    model_url = storage.join(config.out, TOKENIZER_NAME)
    meta_url = storage.join(config.out, TOKENIZER_META_NAME)
    wanted = {"vocab_size": config.vocab_size, "sources": list(config.sources),
              "tokenizer_sample_mb": config.tokenizer_sample_mb}
    try:
        meta = json.loads(storage.read_bytes(meta_url))
        model_bytes = storage.read_bytes(model_url)
        if meta.get("trained_with") == wanted and \
                shard_format.sha256_hex(model_bytes) == meta.get("sha256"):
            return model_bytes
    except (storage.StorageNotFound, ValueError):
        pass  # no usable earlier tokenizer (absent, or its metadata unreadable): train afresh
    budget = int(config.tokenizer_sample_mb * 1024 * 1024) // len(partitions) + 1
    sample = ray.remote(_sample_partition)
    sample_refs = [sample.remote(settings, items, budget) for items in partitions]
    texts = _wait_all(ray, sample_refs, "tokenizer sample", config.progress)
    model_bytes = _get(ray, ray.remote(_train_tokenizer).remote(texts, config.vocab_size,
                                                               config.sources))
    trained_size = SentencePieceTokenizer(model_bytes).vocab_size
    if trained_size < config.vocab_size:
        # Said out loud, not silently: the manifest carries the real size for the model config.
        warnings.warn(f"the tokenizer sample supports only {trained_size} of the {config.vocab_size} "
                      f"pieces asked for; using {trained_size} (raise tokenizer_sample_mb or add "
                      f"data for more)", stacklevel=3)
    storage.write_bytes(model_url, model_bytes)
    meta = {"sha256": shard_format.sha256_hex(model_bytes), "trained_with": wanted,
            "vocab_size": SentencePieceTokenizer(model_bytes).vocab_size}
    storage.write_bytes(meta_url, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return model_bytes


def plan_shards(counts: list[dict], samples_per_shard: int) -> list[tuple[str, str, int, list]]:
    """Cut each (domain, split) stream, in partition order, into shards of samples_per_shard.

    Returns (domain, split, first_index, slices) with slices = [(partition, start, end), ...].
    """
    plan = []
    keys = sorted({key for partition in counts for key in partition})
    for domain, split in keys:
        slices: list[tuple[int, int, int]] = []
        filled, first_index = 0, 0
        for p, partition in enumerate(counts):
            start, available = 0, partition.get((domain, split), 0)
            while start < available:
                take = min(available - start, samples_per_shard - filled)
                slices.append((p, start, start + take))
                start += take
                filled += take
                if filled == samples_per_shard:
                    plan.append((domain, split, first_index, slices))
                    first_index += filled
                    slices, filled = [], 0
        if slices:
            plan.append((domain, split, first_index, slices))
    return plan


def _expand_without_overlap(names: Sequence[str], specs) -> list[source_lib.Item]:
    """Items of all sources; a file matched by two sources would be trained on twice, so that is
    an error naming both sources rather than a silent duplicate."""
    claimed: dict[str, str] = {}
    items = []
    for name, spec in zip(names, specs):
        for item in source_lib.expand(spec):
            if item.url in claimed:
                raise ValueError(f"{item.url} is matched by two sources, {claimed[item.url]!r} and "
                                 f"{name!r}: narrow their globs so each file is read once")
            claimed[item.url] = name
            items.append(item)
    return items


def run_prep(config: PrepConfig) -> str:
    specs = [source_lib.parse_source(spec) for spec in config.sources]
    storage.check_writable_location(config.out)
    settings = storage.S3Settings.from_env()
    items = _expand_without_overlap(config.sources, specs)
    partitions = source_lib.partition(items, int(config.partition_mb * 1024 * 1024))
    ray = _connect_ray()

    model_bytes = _load_or_train_tokenizer(ray, config, settings, partitions)
    tokenizer = SentencePieceTokenizer(model_bytes)
    model_ref = ray.put(model_bytes)
    settings_ref = ray.put(settings)

    encode = ray.remote(num_returns=2)(_encode_partition)
    encoded = [encode.remote(settings_ref, model_ref, items, config.seq_len, config.val_fraction)
               for items in partitions]
    infos = _wait_all(ray, [info for info, _ in encoded], "encode", config.progress)
    sample_refs = [samples for _, samples in encoded]

    dtype = shard_format.token_dtype(tokenizer.vocab_size)
    sample_bytes = (config.seq_len + 1) * dtype.itemsize + _TAR_OVERHEAD_PER_SAMPLE
    samples_per_shard = max(1, int(config.shard_mb * 1024 * 1024) // sample_bytes)
    plan = plan_shards([info["counts"] for info in infos], samples_per_shard)
    if not any(split == "train" for _, split, _, _ in plan):
        tokens = sum(info["stats"]["document_tokens"] for info in infos)
        train = sum(info["train_tokens"] for info in infos)
        raise ValueError(f"no training sample: the corpus gives {tokens} tokens, {train} of them "
                         f"(with EOS) in the train split, not enough for one sample of seq_len + 1 "
                         f"= {config.seq_len + 1} tokens; add data or lower seq_len (documents go "
                         f"to train/val by a hash of their text, so with few documents also lower "
                         f"val_fraction, now {config.val_fraction})")

    write = ray.remote(_write_shard)
    names, write_refs, shard_numbers = [], [], {}
    for domain, split, first_index, slices in plan:
        number = shard_numbers.get((domain, split), 0)
        shard_numbers[(domain, split)] = number + 1
        name = f"{domain}/{split}/shard-{number:06d}.tar"
        needed = sorted({p for p, _, _ in slices})
        local_slices = [(needed.index(p), start, end) for p, start, end in slices]
        names.append((name, domain, split))
        write_refs.append(write.remote(settings_ref, storage.join(config.out, name), domain,
                                       split, first_index, local_slices,
                                       *[sample_refs[p] for p in needed]))
    written = _wait_all(ray, write_refs, "write shards", config.progress)

    stats = {key: sum(info["stats"][key] for info in infos)
             for key in ("documents", "unreadable_files", "dropped_tokens", "document_tokens")}
    stats["partitions"] = len(partitions)
    manifest = Manifest(
        seq_len=config.seq_len, token_dtype=dtype.name, tokenizer_path=TOKENIZER_NAME,
        tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id, stats=stats,
        shards=tuple(ShardInfo(path=name, domain=domain, split=split, samples=w["samples"],
                               tokens=w["tokens"], bytes=w["bytes"], sha256=w["sha256"])
                     for (name, domain, split), w in zip(names, written)))
    manifest_url = storage.join(config.out, MANIFEST_NAME)
    try:
        unchanged = load_manifest(manifest_url).to_json() == manifest.to_json()
    except (storage.StorageNotFound, ValueError):
        unchanged = False
    if not unchanged:
        save_manifest(manifest, manifest_url)
    rewritten = sum(w["written"] for w in written)
    if config.progress:
        print(f"prep: {len(written)} shards ({rewritten} written, {len(written) - rewritten} "
              f"already complete), {stats['documents']} documents -> {manifest_url}")
    return manifest_url
