"""The layout of a prepared dataset and its atomic publication (docs/data.md).

Every file a prep run writes has a content-addressed name (`code/train/shard-000003-<sha256[:16]>.tar`,
`tokenizers/<sha256[:16]>/tokenizer.model`), so it can never replace a file that the published
manifest names with different bytes; nothing a run writes is visible to readers until manifest.json,
the single commit point, is replaced (one atomic os.replace or S3 PUT). A run registers itself
under `.staging/<run-id>/run.json` while it works; after publishing, files no manifest names
(earlier versions, leftovers of interrupted runs) are deleted, unless another live run is registered.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time

from core import shards as shard_format
from core import storage
from core.manifest import MANIFEST_NAME, Manifest, save_manifest
from datasets_prep import sources as source_lib

log = logging.getLogger("datasets_prep.pipeline")

TOKENIZER_DIR = "tokenizers"  # tokenizers/<sha256[:16]>/tokenizer.model + tokenizer.json
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_META_NAME = "tokenizer.json"
STAGING_DIR = ".staging"  # .staging/<run-id>/run.json while a run works on the output
RUN_FILE = "run.json"
# A run on another host whose marker was not refreshed for this long is taken for dead.
STALE_RUN_S = 24 * 3600


def tokenizer_paths(sha256: str) -> tuple[str, str]:
    """(model, metadata) paths of a tokenizer inside a dataset, named by its content."""
    base = f"{TOKENIZER_DIR}/{sha256[:16]}"
    return f"{base}/{TOKENIZER_NAME}", f"{base}/{TOKENIZER_META_NAME}"


def shard_path(domain: str, split: str, number: int, sha256: str) -> str:
    """A shard's path inside a dataset: its place in the stream and its content."""
    return f"{domain}/{split}/shard-{number:06d}-{sha256[:16]}.tar"


# ---------------------------------------------------------------------------------------------
# Staging, publishing, collecting


def relative_files(out: str) -> dict[str, str]:
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


class PrepRun:
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
            delete(self.out, [self.url])
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


def delete(out: str, urls: list[str]) -> None:
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


def collect_garbage(out: str, keep: set[str], run: PrepRun) -> int:
    """Delete the managed files no published manifest names: earlier versions, leftovers of
    interrupted runs, dead runs' registrations. Skipped while another live run is registered:
    the files it is writing are not named by any manifest yet."""
    files = relative_files(out)
    own = f"{STAGING_DIR}/{run.run_id}/"
    for relative, url in files.items():
        parts = relative.split("/")
        if parts[0] == STAGING_DIR and parts[-1] == RUN_FILE and not relative.startswith(own):
            try:
                info = json.loads(storage.read_bytes(url))
            except (storage.StorageNotFound, ValueError):
                continue
            if isinstance(info, dict) and PrepRun.is_live(info):
                log.info("prep: another prep run (%s, pid %s on %s, %s) is writing to %s: files "
                         "no manifest names are left for a later run to delete",
                         info.get("run_id"), info.get("pid"), info.get("host"),
                         info.get("phase"), out)
                return 0
    doomed = [url for relative, url in sorted(files.items())
              if relative not in keep and not relative.startswith(own) and _managed(relative)]
    delete(out, doomed)
    return len(doomed)


def publish(out: str, manifest: Manifest) -> str:
    """Make `manifest` the dataset: check that every file it names is there, then replace
    manifest.json in one atomic write (unless it is already byte for byte this manifest)."""
    present = relative_files(out)
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
