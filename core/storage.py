"""The one storage layer: plain paths / file:// URLs and s3:// URLs behind the same functions.

Prep, the training loader, checkpoints, exports and run records all go through it; S3 itself
(settings from the standard AWS variables, client, retries, the errors a user can act on) is
core.s3, whose names are re-exported here.

Every write is atomic: a local file is written under a temporary name and os.replace()d, a local
directory is built aside and renamed into place; an S3 object only becomes visible when its
(multipart) upload completes, and a directory on S3 is made visible by whatever names it (a
checkpoint's completion markers, an export pointer) being written last.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import os
import shutil
import tempfile
from pathlib import Path

from core.s3 import (  # noqa: F401 (re-exported: the storage layer's S3 side)
    FORWARDED_ENV, MULTIPART_CHUNK_BYTES, MULTIPART_THRESHOLD_BYTES, S3Settings, StorageError, StorageNotFound,
    _client, current_s3_settings, forwarded_env, pyarrow_filesystem, split_s3, use_s3_settings,
    with_retries,
)

# ---------------------------------------------------------------------------------------------
# URLs


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def local_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        raise StorageError(f"unsupported URL scheme in {url!r}: use a plain path, file:// or s3://")
    return url


def join(base: str, *parts: str) -> str:
    """Join URL path components with '/' (os.path.join would break s3:// keys on Windows-style logic)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ---------------------------------------------------------------------------------------------
# Operations


def read_bytes(url: str) -> bytes:
    if is_s3(url):
        bucket, key = split_s3(url)
        return with_retries(lambda: _client().get_object(Bucket=bucket, Key=key)["Body"].read(),
                            what=url)
    path = local_path(url)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageNotFound(f"{url} does not exist") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: readers see either the old object or the complete new one, never a part."""
    if is_s3(url):
        import boto3.s3.transfer

        bucket, key = split_s3(url)
        transfer = boto3.s3.transfer.TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES,
                                                    multipart_chunksize=MULTIPART_CHUNK_BYTES)
        with_retries(lambda: _client().upload_fileobj(io.BytesIO(data), bucket, key,
                                                      Config=transfer), what=url)
        return
    path = local_path(url)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(url: str) -> bool:
    try:
        stat(url)
        return True
    except StorageNotFound:
        return False


@dataclasses.dataclass(frozen=True)
class ObjectStat:
    size: int
    version: str  # S3 ETag or local mtime_ns: changes whenever the object is rewritten


def stat(url: str) -> ObjectStat:
    if is_s3(url):
        bucket, key = split_s3(url)
        head = with_retries(lambda: _client().head_object(Bucket=bucket, Key=key), what=url)
        return ObjectStat(size=head["ContentLength"], version=head["ETag"].strip('"'))
    try:
        st = os.stat(local_path(url))
    except FileNotFoundError:
        raise StorageNotFound(f"{url} does not exist") from None
    return ObjectStat(size=st.st_size, version=str(st.st_mtime_ns))


def check_writable_location(url: str) -> None:
    """Fail fast, before any work is scheduled, if `url` cannot be written (bucket, credentials)."""
    if is_s3(url):
        bucket, _ = split_s3(url)
        try:
            with_retries(lambda: _client().head_bucket(Bucket=bucket), what=f"s3://{bucket}")
        except StorageNotFound:  # HEAD has no body, so a missing bucket is a bare 404
            endpoint = current_s3_settings().endpoint_url or "AWS default endpoint"
            raise StorageError(f"bucket {bucket!r} does not exist at {endpoint}: create it first "
                               f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL {url}") from None
        return
    path = local_path(url)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the output directory {url} ({exc.strerror}): choose "
                           f"a writable location") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"the output directory {url} is not writable by this user: fix its "
                           f"permissions or choose another location")


def list_files(url: str, pattern: str | None = None) -> list[str]:
    """Every file under the prefix/directory `url`, sorted; `pattern` globs the relative path.

    In `pattern`, `*` also crosses '/', so "*.py" matches at any depth (fnmatch semantics).
    """
    base = url.rstrip("/")
    if is_s3(base):
        bucket, prefix = split_s3(base)
        prefix = f"{prefix}/" if prefix else ""

        def list_all() -> list[str]:
            keys = []
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                            Prefix=prefix):
                # Keys ending in "/" are directory markers (pyarrow and Ray Train write them), not files.
                keys.extend(obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
            return keys

        relative = [key[len(prefix):] for key in with_retries(list_all, what=base)]
    else:
        root = local_path(base)
        if os.path.isfile(root):
            return [url]
        if not os.path.isdir(root):
            raise StorageNotFound(f"{url} is not a file or directory")
        relative = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                relative.append(os.path.relpath(os.path.join(dirpath, name), root))
    if pattern is not None:
        relative = [rel for rel in relative if fnmatch.fnmatch(rel, pattern)]
    return [join(base, rel) for rel in sorted(relative)]


# ---------------------------------------------------------------------------------------------
# Text, directories and pointers (checkpoints, exports, run records)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def list_dirs(url: str) -> list[str]:
    """Names of the immediate sub-directories (S3: common prefixes) of `url`, sorted; [] if none."""
    base = url.rstrip("/")
    if is_s3(base):
        bucket, prefix = split_s3(base)
        prefix = f"{prefix}/" if prefix else ""

        def list_prefixes() -> list[str]:
            names = []
            pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return names

        return sorted(with_retries(list_prefixes, what=base))
    root = local_path(base)
    if not os.path.isdir(root):
        return []
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".tmp-"))


def publish_local_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a fully written local directory into place, replacing an older one of the same name."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        trash = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def upload_dir(local_dir: str | Path, url: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy the local directory `local_dir` to `url`, replacing what is there.

    Local: copied beside the target, fsynced and renamed into place, so readers see the old or the
    new directory. S3: every file uploaded (multipart when large), those under the sub-directories
    named in `last` after all others (completion markers); readers must only trust the directory
    once whatever marks it complete has been written after everything else.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageNotFound(f"{local_dir} is not a directory")
    if is_s3(url):
        files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        for name in sorted(files, key=lambda name: name.split("/", 1)[0] in last):
            write_bytes(join(url, name), (local_dir / name).read_bytes())
        return
    final = Path(local_path(url))
    if final.resolve() == local_dir.resolve():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        publish_local_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def download_dir(url: str, local_dir: str | Path) -> Path:
    """A local copy of the directory `url` in `local_dir` (replaced if present); StorageNotFound if empty."""
    local_dir = Path(local_dir)
    files = list_files(url)
    if not files:
        raise StorageNotFound(f"{url} holds no files")
    if local_dir.exists():
        shutil.rmtree(local_dir)
    base = url.rstrip("/")
    for file_url in files:
        target = local_dir / file_url[len(base) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(file_url))
    return local_dir


def localize(url: str, cache_dir: str | Path) -> Path:
    """A local directory holding `url`: the directory itself when local, a download under cache_dir for S3."""
    if not is_s3(url):
        path = Path(local_path(url))
        if not path.is_dir():
            raise StorageNotFound(f"{url} is not a directory")
        return path
    return download_dir(url, Path(cache_dir) / url.rstrip("/").rsplit("/", 1)[-1])


def delete(url: str) -> None:
    """Remove one file / object (nothing if it does not exist)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        with_retries(lambda: _client().delete_object(Bucket=bucket, Key=key), what=url)
        return
    try:
        os.unlink(local_path(url))
    except FileNotFoundError:
        pass


def delete_many(urls: list[str]) -> None:
    """Remove many files / objects (S3: batched, 1000 keys a request); missing ones are fine."""
    by_bucket: dict[str, list[str]] = {}
    for url in urls:
        if is_s3(url):
            bucket, key = split_s3(url)
            by_bucket.setdefault(bucket, []).append(key)
        else:
            delete(url)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            with_retries(lambda: _client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}),
                         what=f"s3://{bucket}")


def delete_tree(url: str) -> None:
    """Remove the directory / prefix `url` and everything under it (nothing if it does not exist)."""
    if is_s3(url):
        try:
            delete_many(list_files(url))
        except StorageNotFound:
            pass
        return
    shutil.rmtree(local_path(url), ignore_errors=True)


def absolute(url: str) -> str:
    """Local paths made absolute (Ray Train and jobs run elsewhere); URLs unchanged."""
    return url if "://" in url and not url.startswith("file://") else os.path.abspath(local_path(url))
