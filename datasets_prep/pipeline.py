"""prepare(): sources -> tokenizer -> packed shards -> manifest.json, as Ray tasks.

Three waves of tasks, each followed by a progress bar:
  1. sample   one task per partition returns a slice of its text for tokenizer training
              (skipped when the config names a tokenizer of its own: prep.tokenizer);
  2. encode   one task per partition tokenizes, splits train/val and packs samples
              (the tokenizer model travels once through the object store);
  3. write    one task per shard serialises its samples and uploads them, unless an identical
              shard (same sha256) is already there.
The driver only moves counts and object references, never token arrays. Shard boundaries are
planned from the counts in partition order, so names and contents depend only on the inputs.
Ray is imported inside functions: the training loader imports this package and must not pull Ray.

Publishing is atomic (docs/data.md): every file a run writes has a content-addressed name
(`code/train/shard-000003-<sha256[:16]>.tar`, `tokenizers/<sha256[:16]>/tokenizer.model`), so it
can never replace a file that the published manifest names with different bytes; nothing a run writes
is visible to readers until manifest.json, the single commit point, is replaced (one atomic
os.replace or S3 PUT). A run registers itself under `.staging/<run-id>/run.json` while it works;
after publishing, files no manifest names (earlier versions, leftovers of interrupted runs) are
deleted, unless another live run is registered. An interrupted or failed run leaves the previous
dataset exactly as it was.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from core import shards as shard_format
from core import storage
from core.config import ConfigError, PrepConfig
from core.manifest import MANIFEST_NAME, Manifest, ShardInfo
from core.tokenizer import SentencePieceTokenizer
from datasets_prep import sources as source_lib
from datasets_prep.publish import PrepRun, collect_garbage, publish, relative_files, shard_path, tokenizer_paths
from datasets_prep.tokenizer_training import (
    byo_tokenizer, find_trained_tokenizer, store_tokenizer, train_tokenizer, train_wanted,
)

log = logging.getLogger(__name__)

# Per-sample overhead inside a tar: two 512-byte headers, padding of two members, npy header, json.
_TAR_OVERHEAD_PER_SAMPLE = 2 * 512 + 2 * 256 + 128 + 64


def prepare(source: str | Sequence[str] = "demo", out: str = "runs/data", *,
            vocab_size: int = 32000, seq_len: int = 2048, **options) -> str:
    """Prepare a dataset with Ray tasks on the local or connected cluster; returns the manifest URL.

    Options are the other fields of core.config.PrepConfig (unknown ones are errors naming the
    key): tokenizer, val_fraction, shard_mb, partition_mb, tokenizer_sample_mb, progress.
    """
    allowed = {f.name for f in dataclasses.fields(PrepConfig)} - {"out", "sources", "vocab_size",
                                                                   "seq_len"}
    for key in options:
        if key not in allowed:
            raise TypeError(f"prepare() got an unknown option {key!r}; allowed: {sorted(allowed)}")
    sources = (source,) if isinstance(source, str) else tuple(source)
    config = PrepConfig(out=out, sources=sources, vocab_size=vocab_size, seq_len=seq_len,
                        **options)
    return run_prep(config)


def _event(level: int, event: str, message: str, *args, **fields) -> None:
    """A log line that also marks a point of the run (record attribute `prep_event`), so a caller
    or a test can act at that point with a logging handler."""
    log.log(level, message, *args, extra={"prep_event": event, "prep_fields": fields})


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


def _write_shard(settings: storage.S3Settings, out: str, domain: str, split: str, number: int,
                 first_index: int, slices: list[tuple[int, int, int]], *partition_samples) -> dict:
    """Build one shard from slices (partition, start, end) of (domain, split) samples and store it
    under its content-addressed name, unless an object with the same sha256 is already there
    (a leftover of an earlier run, or a shard the published manifest already names)."""
    storage.use_s3_settings(settings)
    rows = [partition_samples[p][(domain, split)][start:end] for p, start, end in slices]
    samples = np.concatenate(rows)
    data = shard_format.shard_bytes(samples, domain, first_index)
    digest = shard_format.sha256_hex(data)
    path = shard_path(domain, split, number, digest)
    url = storage.join(out, path)
    written = True
    try:
        if shard_format.sha256_hex(storage.read_bytes(url)) == digest:
            written = False
    except storage.StorageNotFound:
        pass
    if written:  # absent, or damaged since (a same-named object can only differ by corruption)
        storage.write_bytes(url, data)
    return {"path": path, "samples": len(samples), "tokens": int(samples.size),
            "bytes": len(data), "sha256": digest, "written": written}


# ---------------------------------------------------------------------------------------------
# Ray helpers


def _get(ray, ref):
    """ray.get, but a user-fixable error raised inside a task (bad record, missing bucket) comes
    back as itself, with its own message, instead of wrapped in the remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (ValueError, storage.StorageError)):
            raise exc.cause from None
        raise


def _wait_all(ray, refs: list, description: str, progress: bool, event: str | None = None) -> list:
    """ray.get in completion order with a progress bar; results in submission order. With `event`,
    every completed task is also logged (DEBUG) with that event name."""
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
                if event is not None:
                    _event(logging.DEBUG, event, "%s: %d of %d done", description,
                           len(refs) - len(pending), len(refs), result=results[index[ref]])
    return results


def _connect_ray():
    """(ray, started): the caller's Ray when it already connected; else the cluster RAY_ADDRESS
    names (also inside a `ray job submit` job); else a fresh local instance, started here and
    stopped at the end. Never ray.init() with no address, which would join whatever cluster a
    session file in Ray's temp dir names, even one that was stopped long ago."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        log.info("prep: connecting to the Ray cluster at %s (RAY_ADDRESS)", address)
        ray.init(address=address)
    else:
        log.info("prep: starting a local Ray instance")
        ray.init(address="local", include_dashboard=False)
    return ray, True


# ---------------------------------------------------------------------------------------------
# The tokenizer: trained on a sample of the corpus, or brought by the user (prep.tokenizer)


def _tokenizer_model(ray, config: PrepConfig, settings, partitions, files: dict[str, str],
                     byo_model: bytes | None) -> tuple[bytes, str]:
    """(model bytes, its path in the dataset): brought by the user, reused, or trained now."""
    if byo_model is not None:
        return byo_model, store_tokenizer(config.out, byo_model, {"source": config.tokenizer})
    wanted = train_wanted(config)
    model_bytes = find_trained_tokenizer(config.out, files, wanted)
    if model_bytes is None:
        budget = int(config.tokenizer_sample_mb * 1024 * 1024) // len(partitions) + 1
        sample = ray.remote(_sample_partition)
        sample_refs = [sample.remote(settings, items, budget) for items in partitions]
        texts = _wait_all(ray, sample_refs, "tokenizer sample", config.progress)
        model_bytes = _get(ray, ray.remote(_train_tokenizer).remote(texts, config.vocab_size,
                                                                   config.sources))
        trained_size = SentencePieceTokenizer(model_bytes).vocab_size
        if trained_size < config.vocab_size:
            # Said out loud, not silently: the manifest carries the real size for the model config.
            log.warning("prep: the tokenizer sample supports only %d of the %d pieces asked for; "
                        "using %d (raise tokenizer_sample_mb or add data for more)", trained_size,
                        config.vocab_size, trained_size)
    return model_bytes, store_tokenizer(config.out, model_bytes, {"trained_with": wanted})


# ---------------------------------------------------------------------------------------------
# Planning


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
    claimed: dict[tuple, tuple[int, str]] = {}
    items = []
    for number, (name, spec) in enumerate(zip(names, specs)):
        for item in source_lib.expand(spec):
            key = (item.url, item.split, item.rows)
            if key in claimed and claimed[key][0] != number:
                raise ValueError(f"{item.url} is matched by two sources, {claimed[key][1]!r} and "
                                 f"{name!r}: narrow their globs so each file is read once")
            claimed[key] = (number, name)
            items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# Driver


def run_prep(config: PrepConfig) -> str:
    """Prepare the dataset `config` describes into config.out; returns the manifest URL."""
    if not config.out or not config.out.strip("/"):
        raise ConfigError("prep.out: give the output directory, a path or s3:// URL")
    config = dataclasses.replace(config, out=config.out.rstrip("/"))
    out = config.out
    specs = [source_lib.parse_source(spec) for spec in config.sources]
    storage.check_writable_location(out)
    settings = storage.S3Settings.from_env()
    items = _expand_without_overlap(config.sources, specs)
    partitions = source_lib.partition(items, int(config.partition_mb * 1024 * 1024))
    byo_model = byo_tokenizer(config) if config.tokenizer else None  # checked before any work

    ray, started_ray = _connect_ray()
    run = PrepRun(out)
    try:
        run.mark("tokenizer")
        _event(logging.INFO, "staging", "prep: run %s registered at %s", run.run_id, run.url)
        model_bytes, tokenizer_path = _tokenizer_model(ray, config, settings, partitions,
                                                       relative_files(out), byo_model)
        tokenizer = SentencePieceTokenizer(model_bytes)
        _event(logging.INFO, "tokenizer", "prep: tokenizer %s (%d pieces) stored at %s",
               tokenizer.sha256[:16], tokenizer.vocab_size, storage.join(out, tokenizer_path))
        manifest = _encode_and_write(ray, config, settings, partitions, tokenizer, tokenizer_path,
                                     run)
        run.mark("publish")
        manifest_url = publish(out, manifest)
        _event(logging.INFO, "published", "prep: published %s (%d shards, fingerprint %s)",
               manifest_url, len(manifest.shards), manifest.fingerprint[:16])
        keep = {MANIFEST_NAME, tokenizer_path, tokenizer_paths(manifest.tokenizer_sha256)[1],
                *(s.path for s in manifest.shards)}
        removed = collect_garbage(out, keep, run)
        _event(logging.INFO, "collected", "prep: removed %d files that no manifest names",
               removed)
    finally:
        try:
            run.end()
        finally:
            if started_ray:
                ray.shutdown()
    return manifest_url


def _encode_and_write(ray, config: PrepConfig, settings, partitions, tokenizer,
                      tokenizer_path: str, run: PrepRun) -> Manifest:
    """Waves 2 and 3: encode every partition, write every shard; returns the manifest to publish."""
    model_ref = ray.put(tokenizer.model_bytes)
    settings_ref = ray.put(settings)
    run.mark("encode")
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

    run.mark("write")
    write = ray.remote(_write_shard)
    write_refs, shard_numbers = [], {}
    for domain, split, first_index, slices in plan:
        number = shard_numbers.get((domain, split), 0)
        shard_numbers[(domain, split)] = number + 1
        needed = sorted({p for p, _, _ in slices})
        local_slices = [(needed.index(p), start, end) for p, start, end in slices]
        write_refs.append(write.remote(settings_ref, config.out, domain, split, number,
                                       first_index, local_slices,
                                       *[sample_refs[p] for p in needed]))
    written = _wait_all(ray, write_refs, "write shards", config.progress, event="shard")

    stats = {key: sum(info["stats"][key] for info in infos)
             for key in ("documents", "unreadable_files", "dropped_tokens", "document_tokens")}
    stats["partitions"] = len(partitions)
    rewritten = sum(w["written"] for w in written)
    log.info("prep: %d shards (%d written, %d already complete), %d documents", len(written),
             rewritten, len(written) - rewritten, stats["documents"])
    return Manifest(
        seq_len=config.seq_len, token_dtype=dtype.name, tokenizer_path=tokenizer_path,
        tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id, stats=stats,
        shards=tuple(ShardInfo(path=w["path"], domain=domain, split=split, samples=w["samples"],
                               tokens=w["tokens"], bytes=w["bytes"], sha256=w["sha256"])
                     for (domain, split, _, _), w in zip(plan, written)))
