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
import json
import logging
import os
import secrets
import socket
import time
from typing import Sequence

import numpy as np

from core import shards as shard_format
from core import storage
from core.config import ConfigError, PrepConfig
from core.manifest import MANIFEST_NAME, Manifest, ShardInfo, save_manifest
from core.tokenizer import NEWLINE_PIECE, SentencePieceTokenizer
from datasets_prep import sources as source_lib
from datasets_prep.tokenizer_training import train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizers"  # tokenizers/<sha256[:16]>/tokenizer.model + tokenizer.json
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_META_NAME = "tokenizer.json"
STAGING_DIR = ".staging"  # .staging/<run-id>/run.json while a run works on the output
RUN_FILE = "run.json"
# A run on another host whose marker was not refreshed for this long is taken for dead.
STALE_RUN_S = 24 * 3600
# Per-sample overhead inside a tar: two 512-byte headers, padding of two members, npy header, json.
_TAR_OVERHEAD_PER_SAMPLE = 2 * 512 + 2 * 256 + 128 + 64


def tokenizer_paths(sha256: str) -> tuple[str, str]:
    """(model, metadata) paths of a tokenizer inside a dataset, named by its content."""
    base = f"{TOKENIZER_DIR}/{sha256[:16]}"
    return f"{base}/{TOKENIZER_NAME}", f"{base}/{TOKENIZER_META_NAME}"


def shard_path(domain: str, split: str, number: int, sha256: str) -> str:
    """A shard's path inside a dataset: its place in the stream and its content."""
    return f"{domain}/{split}/shard-{number:06d}-{sha256[:16]}.tar"


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

_ROUND_TRIP_PROBES = (
    "def f(x):\n\treturn x  # two  spaces, a tab\n",
    "  leading and trailing spaces  ",
    "ligatures \ufb01 and full-width \uff21\uff22 stay as written",
    "a literal <nl> is text, not a newline",
    "caf\u00e9 \u2603 \U0001d518 \u4e2d\u6587 \x00\x7f",
)


def check_tokenizer_model(model_bytes: bytes, url: str) -> SentencePieceTokenizer:
    """The tokenizer of a SentencePiece model the user brings, if the packer can use it: the
    newline control piece, an EOS id, byte fallback, text given back unchanged. Otherwise a
    ValueError that names every missing piece and how to train a model that has it."""
    import sentencepiece as spm

    how = (f"train one with datasets_prep.train_tokenizer(texts, vocab_size), or pass "
           f"control_symbols=['{NEWLINE_PIECE}'], byte_fallback=True, "
           f"normalization_rule_name='identity', remove_extra_whitespaces=False and eos_id >= 0 to "
           f"spm.SentencePieceTrainer.train ('{NEWLINE_PIECE}' as a control symbol: a "
           f"user_defined_symbols piece would turn a literal '{NEWLINE_PIECE}' in the text into a "
           f"newline)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as exc:  # noqa: BLE001 - SentencePiece raises a bare RuntimeError
        raise ValueError(f"the tokenizer {url} is not a SentencePiece model "
                         f"({str(exc).strip()[:200]}): give the .model file SentencePiece training "
                         f"wrote; {how}") from None
    problems = []
    newline = sp.piece_to_id(NEWLINE_PIECE)
    if sp.get_piece_size() == 0 or sp.id_to_piece(newline) != NEWLINE_PIECE:
        problems.append(f"no {NEWLINE_PIECE!r} control piece (the newline between lines)")
    elif not sp.is_control(newline):
        problems.append(f"{NEWLINE_PIECE!r} is a normal or user-defined piece, not a control "
                        f"piece, so a literal {NEWLINE_PIECE!r} in the text would become a "
                        f"newline")
    if sp.get_piece_size() == 0 or sp.eos_id() < 0:
        problems.append("no end-of-sequence id (it was trained with eos_id=-1)")
    missing_bytes = [b for b in range(256)
                     if sp.get_piece_size() == 0
                     or not sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>"))]
    if missing_bytes:
        problems.append(f"no byte fallback ({len(missing_bytes)} of the 256 byte pieces <0x00>.."
                        f"<0xFF> are missing), so text outside its vocabulary would become <unk>")
    if not problems:
        tokenizer = SentencePieceTokenizer(model_bytes)
        for probe in _ROUND_TRIP_PROBES:
            back = tokenizer.decode(tokenizer.encode(probe))
            if back != probe:
                problems.append(f"it does not give text back unchanged ({probe!r} decodes as "
                                f"{back!r}): it normalises text or squashes whitespace")
                break
    if problems:
        raise ValueError(f"the tokenizer {url} cannot be used to pack this dataset: it has "
                         f"{'; '.join(problems)}. To get one that can, {how}")
    return tokenizer


def _byo_tokenizer(config: PrepConfig) -> bytes:
    try:
        model_bytes = storage.read_bytes(config.tokenizer)
    except storage.StorageNotFound:
        raise storage.StorageNotFound(f"the tokenizer {config.tokenizer} (prep.tokenizer) does not "
                                      f"exist: give the path or s3:// URL of a SentencePiece "
                                      f".model file") from None
    tokenizer = check_tokenizer_model(model_bytes, config.tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        log.info("prep: prep.vocab_size=%d is ignored: the tokenizer %s has %d pieces, and the "
                 "dataset uses those", config.vocab_size, config.tokenizer, tokenizer.vocab_size)
    return model_bytes


def _train_wanted(config: PrepConfig) -> dict:
    """What decides a trained tokenizer: a stored one trained with the same values is reused."""
    return {"vocab_size": config.vocab_size, "sources": list(config.sources),
            "tokenizer_sample_mb": config.tokenizer_sample_mb}


def _find_trained_tokenizer(out: str, files: dict[str, str], wanted: dict) -> bytes | None:
    """A tokenizer stored in the output (published, left by an interrupted run, or at the top of
    a dataset written before versioned tokenizers) that was trained with `wanted` and is intact;
    None when there is none."""
    for relative, url in sorted(files.items()):
        parts = relative.split("/")
        if len(parts) == 3 and parts[0] == TOKENIZER_DIR and parts[2] == TOKENIZER_META_NAME:
            model_path = f"{TOKENIZER_DIR}/{parts[1]}/{TOKENIZER_NAME}"
        elif relative == TOKENIZER_META_NAME:  # the earlier layout: <out>/tokenizer.json
            model_path = TOKENIZER_NAME
        else:
            continue
        try:
            meta = json.loads(storage.read_bytes(url))
            if not isinstance(meta, dict) or meta.get("trained_with") != wanted:
                continue
            model_bytes = storage.read_bytes(storage.join(out, model_path))
        except (storage.StorageNotFound, ValueError, KeyError, TypeError):
            continue  # unreadable metadata or a missing model: not reusable, train afresh
        digest = shard_format.sha256_hex(model_bytes)
        if digest == meta.get("sha256") and (model_path == TOKENIZER_NAME
                                            or parts[1] == digest[:16]):
            return model_bytes
    return None


def _write_if_changed(url: str, data: bytes) -> bool:
    try:
        if storage.read_bytes(url) == data:
            return False
    except storage.StorageNotFound:
        pass
    storage.write_bytes(url, data)
    return True


def _store_tokenizer(out: str, model_bytes: bytes, origin: dict) -> str:
    """Store the model under its content-addressed path (not rewritten when already there);
    returns that path, relative to `out`."""
    tokenizer = SentencePieceTokenizer(model_bytes)
    model_path, meta_path = tokenizer_paths(tokenizer.sha256)
    _write_if_changed(storage.join(out, model_path), model_bytes)
    meta = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, **origin}
    _write_if_changed(storage.join(out, meta_path),
                      (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return model_path


def _tokenizer_model(ray, config: PrepConfig, settings, partitions, files: dict[str, str],
                     byo_model: bytes | None) -> tuple[bytes, str]:
    """(model bytes, its path in the dataset): brought by the user, reused, or trained now."""
    if byo_model is not None:
        return byo_model, _store_tokenizer(config.out, byo_model, {"source": config.tokenizer})
    wanted = _train_wanted(config)
    model_bytes = _find_trained_tokenizer(config.out, files, wanted)
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
    return model_bytes, _store_tokenizer(config.out, model_bytes, {"trained_with": wanted})


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
# Staging, publishing, collecting


def _relative_files(out: str) -> dict[str, str]:
    """{path relative to out: URL} of every file under the output (one listing)."""
    try:
        urls = storage.list_files(out)
    except storage.StorageNotFound:
        return {}
    base = out.rstrip("/") + "/"
    return {url[len(base):]: url for url in urls if url.startswith(base)}


def _process_start(pid: int) -> str | None:
    """The start time of a live (not zombie) process of this host, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"  # alive, start time unknown (no /proc)
    return None if fields[0] == "Z" else fields[19]


class _Run:
    """This run's registration under .staging/<run-id>/run.json: it tells a concurrent run's
    garbage collection that the files this run is writing are not garbage."""

    def __init__(self, out: str):
        self.out = out
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.url = storage.join(out, STAGING_DIR, self.run_id, RUN_FILE)
        self.started = time.time()

    def mark(self, phase: str) -> None:
        info = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "started": self.started,
                "updated": time.time(), "phase": phase}
        storage.write_bytes(self.url, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())

    def end(self) -> None:
        try:
            _delete(self.out, [self.url])
        except storage.StorageError as exc:  # never hide the error that ended the run
            log.warning("prep: could not remove the run registration %s (%s); the next run "
                        "removes it", self.url, exc)

    @staticmethod
    def is_live(info: dict) -> bool:
        try:
            if info.get("host") == socket.gethostname():
                start = _process_start(int(info["pid"]))
                return start is not None and start in ("?", info.get("pid_start"))
            return time.time() - float(info["updated"]) < STALE_RUN_S
        except (KeyError, TypeError, ValueError):
            return False  # an unreadable registration protects nothing


def _delete(out: str, urls: list[str]) -> None:
    """Delete files (S3 keys in batches); local directories left empty under `out` go too."""
    storage.delete_many(list(urls))
    root = None if storage.is_s3(out) else os.path.abspath(storage.local_path(out))
    for url in urls:
        if root is None or storage.is_s3(url):
            continue
        parent = os.path.dirname(os.path.abspath(storage.local_path(url)))
        while parent.startswith(root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def _managed(relative: str) -> bool:
    """Files prep owns in an output directory (anything else there is the user's and is kept)."""
    parts = relative.split("/")
    name = parts[-1]
    if parts[0] in (STAGING_DIR, TOKENIZER_DIR) and len(parts) > 1:
        return True
    if len(parts) == 1:  # the pre-staging layout's tokenizer files, and interrupted temp files
        return name in (TOKENIZER_NAME, TOKENIZER_META_NAME) or name.startswith(".tmp-")
    return (len(parts) == 3 and parts[0] in source_lib.DOMAINS and parts[1] in shard_format.SPLITS
            and ((name.startswith("shard-") and name.endswith(".tar")) or name.startswith(".tmp-")))


def _collect_garbage(out: str, keep: set[str], run: _Run) -> int:
    """Delete the managed files no published manifest names: earlier versions, leftovers of
    interrupted runs, dead runs' registrations. Skipped while another live run is registered:
    the files it is writing are not named by any manifest yet."""
    files = _relative_files(out)
    own = f"{STAGING_DIR}/{run.run_id}/"
    for relative, url in files.items():
        parts = relative.split("/")
        if parts[0] == STAGING_DIR and parts[-1] == RUN_FILE and not relative.startswith(own):
            try:
                info = json.loads(storage.read_bytes(url))
            except (storage.StorageNotFound, ValueError):
                continue
            if isinstance(info, dict) and _Run.is_live(info):
                log.info("prep: another prep run (%s, pid %s on %s, %s) is writing to %s: files "
                         "no manifest names are left for a later run to delete",
                         info.get("run_id"), info.get("pid"), info.get("host"),
                         info.get("phase"), out)
                return 0
    doomed = [url for relative, url in sorted(files.items())
              if relative not in keep and not relative.startswith(own) and _managed(relative)]
    _delete(out, doomed)
    return len(doomed)


def _publish(out: str, manifest: Manifest) -> str:
    """Make `manifest` the dataset: check that every file it names is there, then replace
    manifest.json in one atomic write (unless it is already byte for byte this manifest)."""
    present = _relative_files(out)
    missing = [p for p in [manifest.tokenizer_path, *(s.path for s in manifest.shards)]
               if p not in present]
    if missing:
        raise storage.StorageError(f"{len(missing)} files this run wrote to {out} are gone (e.g. "
                                   f"{missing[0]}): was another prep run collecting this output? "
                                   f"Run prep again; the published dataset was left as it was")
    manifest_url = storage.join(out, MANIFEST_NAME)
    try:
        unchanged = storage.read_bytes(manifest_url) == manifest.to_json().encode()
    except storage.StorageNotFound:
        unchanged = False
    if not unchanged:
        save_manifest(manifest, manifest_url)
    return manifest_url


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
    byo_model = _byo_tokenizer(config) if config.tokenizer else None  # checked before any work

    ray, started_ray = _connect_ray()
    run = _Run(out)
    try:
        run.mark("tokenizer")
        _event(logging.INFO, "staging", "prep: run %s registered at %s", run.run_id, run.url)
        model_bytes, tokenizer_path = _tokenizer_model(ray, config, settings, partitions,
                                                       _relative_files(out), byo_model)
        tokenizer = SentencePieceTokenizer(model_bytes)
        _event(logging.INFO, "tokenizer", "prep: tokenizer %s (%d pieces) stored at %s",
               tokenizer.sha256[:16], tokenizer.vocab_size, storage.join(out, tokenizer_path))
        manifest = _encode_and_write(ray, config, settings, partitions, tokenizer, tokenizer_path,
                                     run)
        run.mark("publish")
        manifest_url = _publish(out, manifest)
        _event(logging.INFO, "published", "prep: published %s (%d shards, fingerprint %s)",
               manifest_url, len(manifest.shards), manifest.fingerprint[:16])
        keep = {MANIFEST_NAME, tokenizer_path, tokenizer_paths(manifest.tokenizer_sha256)[1],
                *(s.path for s in manifest.shards)}
        removed = _collect_garbage(out, keep, run)
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
                      tokenizer_path: str, run: _Run) -> Manifest:
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
