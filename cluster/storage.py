"""Run storage (a local directory or s3://bucket/prefix) seen through one pyarrow filesystem.

Ray Train uploads checkpoints through pyarrow; we list, read and download them the same way, so a
local path and an S3 bucket behave alike. An S3-compatible server outside AWS (MinIO, `rclone
serve s3`, ...) is reached through AWS_ENDPOINT_URL, the variable boto3 and datasets_prep also use.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def absolute_storage_path(url: str) -> str:
    """Ray Train needs an absolute local path; s3:// URLs pass through."""
    return url if is_s3(url) else str(Path(url).expanduser().resolve())


def filesystem_for(url: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URL."""
    if not is_s3(url):
        return pafs.LocalFileSystem(), absolute_storage_path(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = dict(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    # Path-style addressing: local S3 servers do not serve bucket subdomains.
    return pafs.S3FileSystem(**options, force_virtual_addressing=False), url.removeprefix("s3://").rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(info.path for info in infos if info.type == pafs.FileType.Directory)


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    # Written under a temporary name and moved: a reader never sees half a file (local; on S3 a
    # PUT is atomic already and move is a copy, so the same code stays correct).
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write(text.encode())
    fs.move(tmp, path)


def download_dir(fs: pafs.FileSystem, path: str, local: str | Path) -> Path:
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def localize(url: str, *, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding `url` (itself when it is local; a downloaded copy when it is s3://)."""
    if not is_s3(url):
        return Path(url)
    fs, path = filesystem_for(url)
    target = Path(cache_dir or tempfile.mkdtemp(prefix="mmrec-download-")) / Path(path).name
    if target.exists():
        shutil.rmtree(target)
    return download_dir(fs, path, target)
