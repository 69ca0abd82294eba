"""One checkpoint layout for both engines, sealed by per-rank completion markers, and export pointers.

A run lives in one directory, a local path or s3://bucket/prefix (run.storage_path / run.name):

    step_00000500-1a2b3c4d/          a checkpoint (the suffix is the attempt that wrote it)
        run.json                     rank 0: step, world size, engine, loader position, loop state, config
        engine/...                   the engine's own state: model + optimizer (torch), or DeepSpeed's
                                     checkpoint files of every rank (ZeRO partitions)
        frozen.safetensors           rank 0: the frozen parameters, exact fp32
        rng/rank_00000.pt            every rank: its RNG state
        complete/rank_00000.json     every rank, written last: size and sha256 of every file it wrote
    exports/step_00000500/           a weights export (mmrec.train.export): what the next stage loads
    exports/latest, exports/best     pointers: the name of the newest export and of the best one
    metrics.jsonl, loss.png          the run's records (mmrec.train.records)

A checkpoint is complete when run.json names the world size and every rank's marker is present and
matches the files. Resuming takes the newest complete checkpoint; broken ones are skipped with a
warning (a broken latest falls back to the previous one). A Ray Train worker hands its part to
ray.train.report, which uploads it; the single-process engine publishes the same directory through
core.storage. Exports are found through their pointers, which are written after the export itself,
so `run:<name>` never needs to open, let alone hash, a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import storage

RUN_FILE, FROZEN_FILE = "run.json", "frozen.safetensors"
ENGINE_DIR, RNG_DIR, COMPLETE_DIR, EXPORTS_DIR = "engine", "rng", "complete", "exports"
POINTERS = ("latest", "best")
RUN_REFERENCE = "run:"
_NAME = re.compile(r"^step_(\d{8})-([0-9a-f]+)$")


class CheckpointIncomplete(RuntimeError):
    """A checkpoint lacks a rank's files, or holds files that do not match its completion markers."""


def checkpoint_name(step: int, attempt_id: str) -> str:
    # The attempt id keeps a re-run of a step (after falling back past a broken checkpoint) from
    # writing into the directory of the broken one.
    return f"step_{step:08d}-{attempt_id}"


def export_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker(directory: Path, rank: int) -> Path:
    return directory / COMPLETE_DIR / f"rank_{rank:05d}.json"


def seal_rank(directory: str | Path, rank: int) -> Path:
    """Write this rank's completion marker over every file it wrote into `directory` (call last)."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): [path.stat().st_size, file_sha256(path)]
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).parts[0] != COMPLETE_DIR
    }
    marker = _marker(directory, rank)
    storage.write_text(str(marker), json.dumps({"rank": rank, "files": files}, indent=1))
    return marker


def read_run_info(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        raise CheckpointIncomplete(f"{directory}: {RUN_FILE} is missing (rank 0 did not finish writing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointIncomplete(f"{path} is not valid JSON ({error})") from None


def verify_complete(directory: str | Path) -> dict[str, Any]:
    """The run info of a complete checkpoint; CheckpointIncomplete naming the first problem otherwise."""
    directory = Path(directory)
    info = read_run_info(directory)
    for rank in range(int(info["world_size"])):
        marker = _marker(directory, rank)
        if not marker.is_file():
            raise CheckpointIncomplete(f"{directory}: rank {rank} of {info['world_size']} never marked its part complete")
        for name, (size, sha) in json.loads(marker.read_text())["files"].items():
            path = directory / name
            if not path.is_file():
                raise CheckpointIncomplete(f"{directory}: {name} (written by rank {rank}) is missing")
            if path.stat().st_size != size or file_sha256(path) != sha:
                raise CheckpointIncomplete(f"{directory}: {name} (written by rank {rank}) is truncated or corrupt")
    return info


@dataclass
class ResumePoint:
    directory: Path  # a local directory holding the whole checkpoint
    source: str  # where it lives in the run directory (path or s3:// URL)
    info: dict[str, Any]  # run.json


def list_checkpoints(run_url: str) -> list[str]:
    """Checkpoint directory names of a run, newest first."""
    names = [n for n in storage.list_dirs(run_url) if step_of(n) is not None]
    return sorted(names, key=lambda n: (step_of(n), n), reverse=True)


def find_resume_point(run_url: str, *, download_to: str | Path | None = None) -> ResumePoint | None:
    """The newest complete checkpoint of the run, or None when it has none at all.

    Broken or incomplete checkpoints are skipped with a warning. When checkpoints exist but none is
    complete, that is an error: silently starting over would throw the run away.
    """
    problems = []
    for name in list_checkpoints(run_url):
        source = storage.join(run_url, name)
        if storage.is_s3(run_url):
            cache = Path(download_to or tempfile.mkdtemp(prefix="mmrec-resume-"))
            try:
                local = storage.download_dir(source, cache / name)
            except storage.StorageNotFound as error:
                problems.append(str(error))
                continue
        else:
            local = Path(storage.local_path(source))
        try:
            info = verify_complete(local)
        except CheckpointIncomplete as error:
            problems.append(str(error))
            warnings.warn(f"skipping checkpoint {source}: {error}; falling back to an older one", stacklevel=2)
            continue
        return ResumePoint(directory=local, source=source, info=info)
    if problems:
        raise CheckpointIncomplete(
            f"no complete checkpoint in {run_url}; choose another run.name to start over:\n  " + "\n  ".join(problems)
        )
    return None


def publish_checkpoint(local_dir: Path, run_url: str, name: str, *, keep: int) -> str:
    """Copy a sealed checkpoint into the run directory and drop all but the newest `keep` (single process).

    Distributed runs hand the same directory to ray.train.report instead, which uploads and prunes.
    """
    target = storage.join(run_url, name)
    storage.upload_dir(local_dir, target, last=(COMPLETE_DIR,))
    for old in list_checkpoints(run_url)[keep:]:
        storage.delete_tree(storage.join(run_url, old))
    return target


# ---- export pointers ----


def exports_url(run_url: str) -> str:
    return storage.join(run_url, EXPORTS_DIR)


def write_pointer(run_url: str, which: str, name: str) -> None:
    storage.write_text(storage.join(exports_url(run_url), which), name + "\n")


def read_pointer(run_url: str, which: str) -> str | None:
    try:
        return storage.read_text(storage.join(exports_url(run_url), which)).strip() or None
    except storage.StorageNotFound:
        return None


def prune_exports(run_url: str, *, keep_newest: int = 2) -> None:
    """Drop export directories that no pointer names, keeping the newest few."""
    named = {read_pointer(run_url, which) for which in POINTERS}
    exports = sorted(storage.list_dirs(exports_url(run_url)), reverse=True)
    for name in exports[keep_newest:]:
        if name not in named:
            storage.delete_tree(storage.join(exports_url(run_url), name))


def resolve_export(reference: str, storage_path: str) -> str:
    """An export directory (path or URL, returned as it is) or `run:<name>[@best|@latest]`.

    run:<name> means that run's best export (the latest when it never validated) under storage_path.
    """
    if not reference.startswith(RUN_REFERENCE):
        return reference
    run_name, _, which = reference.removeprefix(RUN_REFERENCE).partition("@")
    if which not in ("", *POINTERS):
        raise ValueError(f"{reference!r}: the part after @ must be best or latest")
    run_url = storage.join(storage_path, run_name)
    for pointer in ([which] if which else ["best", "latest"]):
        name = read_pointer(run_url, pointer)
        if name is not None:
            return storage.join(exports_url(run_url), name)
    raise FileNotFoundError(
        f"{reference!r}: run {run_name!r} has no export under {storage_path} (no {exports_url(run_url)}/"
        f"{which or 'best'} pointer); run that stage first, or give the export directory itself"
    )


# ---- RNG state as weights_only-safe values ----


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached),
        python=dict(version=version, state=torch.tensor(py_state, dtype=torch.int64), gauss_next=gauss_next),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
