"""Training checkpoints: atomic, self-verifying, loadable with torch.load(weights_only=True).

Layout of a checkpoint directory:

    <dir>/step_00000500/state.pt    torch.save of plain containers and tensors only
    <dir>/step_00000500/meta.json   {"step", "bytes", "sha256"} of state.pt
    <dir>/latest                    name of the newest complete checkpoint

A checkpoint is built in a hidden temporary directory, fsynced, and renamed into place; `latest` is
replaced only after that, so a process killed at any point leaves the previous checkpoint usable.
On load the size and sha256 of state.pt are checked first, so a truncated or corrupted file is
reported as such instead of as an unpickling error deep inside torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE, META_FILE, LATEST_FILE = "state.pt", "meta.json", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and the problem."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish_directory(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory to `final`, replacing an older one of the same name."""
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write `state` (tensors and plain containers only) as the checkpoint of `step`; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.tmp-*"):  # left behind by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / step_dir_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    state_path = tmp / STATE_FILE
    with open(state_path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    meta = dict(step=step, bytes=state_path.stat().st_size, sha256=file_sha256(state_path))
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
    publish_directory(tmp, final)
    atomic_write_text(directory / LATEST_FILE, final.name + "\n")
    _prune(directory, keep=keep, protect=final)
    return final


def _prune(directory: Path, *, keep: int, protect: Path) -> None:
    complete = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in complete[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint directory after verifying it is complete and intact."""
    path = Path(path)
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: expected {META_FILE} and {STATE_FILE} in it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is not valid JSON ({error})") from None
    size = state_path.stat().st_size
    if size != meta["bytes"]:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt: {STATE_FILE} has {size} bytes, {META_FILE} says {meta['bytes']}"
        )
    if file_sha256(state_path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: the sha256 of {STATE_FILE} does not match {META_FILE}")
    return torch.load(state_path, map_location="cpu", weights_only=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first (by step in the name)."""
    return sorted((p for p in Path(directory).glob("step_*") if p.is_dir()), reverse=True)


def load_latest(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint under `directory`, or None when there is none at all.

    Tries the `latest` pointer first; if that checkpoint is broken, warns and falls back to older ones.
    Raises CheckpointError when checkpoints exist but none of them can be loaded.
    """
    directory = Path(directory)
    candidates = list_checkpoints(directory)
    pointer = directory / LATEST_FILE
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    if not candidates:
        return None
    problems = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except (CheckpointError, OSError, RuntimeError) as error:
            problems.append(f"{candidate}: {error}")
            warnings.warn(f"skipping unusable checkpoint, falling back to an older one: {error}", stacklevel=2)
            continue
        return candidate, state
    raise CheckpointError(f"no usable checkpoint under {directory}:\n  " + "\n  ".join(problems))


# ---- RNG state as weights_only-safe values ----


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached),
        python=dict(version=version, state=torch.tensor(py_state, dtype=torch.int64), gauss_next=gauss_next),
    )


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
