"""Layout, completion markers and fallback of the distributed checkpoints reported to Ray Train.

Every rank writes its part into a local directory and reports it with ray.train.report; Ray Train
merges the parts of all ranks into one directory under <storage>/<run>/step_<step>-<attempt>:

    run.json                   rank 0: step, world size, ZeRO stage, job/model config, loader position,
                               lr scale, NaN rollbacks, DeepSpeed tag
    history.json               rank 0: per-step loss, lr, grad norm (and sample digests) of the run so far
    deepspeed/<tag>/...        every rank: DeepSpeed's own checkpoint files (model, ZeRO partitions)
    frozen.safetensors         rank 0: the frozen parameters, exact fp32 (DeepSpeed issues 3090, 6771 and
                               4055 lose or round them; they are restored from here after loading)
    export/                    rank 0: consolidated fp32 export for the next stage and for generate
    rng/rank_<r>.pt            every rank: its RNG state
    complete/rank_<r>.json     every rank, written last: size and sha256 of every file the rank wrote

A checkpoint is complete when run.json names the world size and every rank's marker is present
and matches the files. Resuming takes the newest complete checkpoint; broken ones are skipped with
a warning, which is how a broken latest falls back to the previous one.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import storage
from mmrec.train.checkpoint import file_sha256

RUN_FILE, HISTORY_FILE, FROZEN_FILE = "run.json", "history.json", "frozen.safetensors"
DEEPSPEED_DIR, EXPORT_DIR, RNG_DIR, COMPLETE_DIR = "deepspeed", "export", "rng", "complete"
_NAME = re.compile(r"^step_(\d{8})-([0-9a-f]+)$")


class CheckpointIncomplete(RuntimeError):
    """A checkpoint directory lacks a rank's files or holds files that do not match the markers."""


def checkpoint_dir_name(step: int, attempt_id: str) -> str:
    # The attempt id keeps a re-run of a step (after falling back past a broken checkpoint) from
    # writing into the directory of the broken one.
    return f"step_{step:08d}-{attempt_id}"


def step_of(name: str) -> int | None:
    match = _NAME.match(Path(name).name)
    return int(match.group(1)) if match else None


def _marker(directory: Path, rank: int) -> Path:
    return directory / COMPLETE_DIR / f"rank_{rank:05d}.json"


def seal_rank(directory: str | Path, rank: int) -> Path:
    """Write this rank's completion marker over everything it wrote into `directory` (call last)."""
    directory = Path(directory)
    files = {
        str(path.relative_to(directory)): [path.stat().st_size, file_sha256(path)]
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).parts[0] != COMPLETE_DIR
    }
    marker = _marker(directory, rank)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    tmp.replace(marker)
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
    source: str  # where it lives in the run storage (path or s3:// URL)
    info: dict[str, Any]  # run.json


def find_resume_point(storage_url: str, run_name: str, *, download_to: str | Path | None = None) -> ResumePoint | None:
    """The newest complete checkpoint of the run, or None when there is none at all.

    Broken or incomplete checkpoints are skipped with a warning. When checkpoints exist but none is
    complete, that is an error: silently starting over would throw away the run.
    """
    fs, root = storage.filesystem_for(storage_url)
    run_dir = storage.join(root, run_name)
    candidates = sorted(
        (p for p in storage.list_dirs(fs, run_dir) if step_of(p) is not None), key=lambda p: (step_of(p), p), reverse=True
    )
    problems = []
    for path in candidates:
        if storage.is_s3(storage_url):
            local = storage.download_dir(fs, path, Path(download_to or tempfile.mkdtemp(prefix="mmrec-resume-")) / Path(path).name)
            source = "s3://" + path
        else:
            local, source = Path(path), path
        try:
            info = verify_complete(local)
        except CheckpointIncomplete as error:
            problems.append(str(error))
            warnings.warn(f"skipping checkpoint {source}: {error}; falling back to an older one", stacklevel=2)
            continue
        return ResumePoint(directory=local, source=source, info=info)
    if problems:
        raise CheckpointIncomplete(
            f"no complete checkpoint under {storage_url}/{run_name}; use another run name to start over:\n  " + "\n  ".join(problems)
        )
    return None


RUN_REFERENCE = "run:"


def resolve_run_reference(value: str, storage_url: str) -> str:
    """`run:<name>` -> the export of run <name>'s newest complete checkpoint; anything else unchanged."""
    if not value.startswith(RUN_REFERENCE):
        return value
    run_name = value.removeprefix(RUN_REFERENCE)
    with tempfile.TemporaryDirectory(prefix="mmrec-init-") as scratch:
        point = find_resume_point(storage_url, run_name, download_to=scratch)
    if point is None:
        raise FileNotFoundError(
            f"{value!r}: run {run_name!r} has no checkpoint under {storage_url}; run that stage first "
            "or give the export directory itself"
        )
    return storage.join(point.source, EXPORT_DIR)


def to_universal(resume: ResumePoint, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads at any world size.

    A ZeRO checkpoint holds one optimizer partition per rank and loads only at the world size that
    wrote it; an elastic restart with fewer or more workers goes through this conversion (the
    checkpoint carries `universal_checkpoint_info` for it). Returns the directory to load from with
    the "checkpoint.load_universal" DeepSpeed option.
    """
    tag = resume.info["tag"]
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
         str(resume.directory / DEEPSPEED_DIR / tag), "--output_folder", str(out / tag),
         "--num_extract_workers", "1", "--num_merge_workers", "1"],
        check=True, stdout=subprocess.DEVNULL,
    )
    (out / "latest_universal").write_text(tag)
    return out
