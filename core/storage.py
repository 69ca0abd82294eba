"""One small object-store layer: plain paths / file:// URLs and s3:// URLs behind the same functions.

S3 goes through boto3, which already honours AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_PROFILE. Every write is atomic: a local file
is written under a temporary name and os.replace()d; an S3 object only becomes visible when its
(multipart) upload completes. Failures that a user can fix (wrong credentials, missing bucket,
unreachable endpoint, missing object) are raised as StorageError with a message saying what to do.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import os
import random
import tempfile
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# Multipart kicks in above 8 MiB so that large shards upload in parallel parts and a failed part
# is retried alone instead of restarting the whole object.
MULTIPART_THRESHOLD_BYTES = 8 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_ATTEMPTS = 6


class StorageError(RuntimeError):
    """A storage failure the user can act on; the message says what went wrong and what to do."""


class StorageNotFound(StorageError):
    """The object or file does not exist."""


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Connection settings for S3, captured from the environment so they can be shipped to Ray tasks."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    max_attempts: int = DEFAULT_ATTEMPTS

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )

    def __repr__(self) -> str:  # never print secrets into logs
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


_settings_override: S3Settings | None = None
_clients: dict[S3Settings, object] = {}


def use_s3_settings(settings: S3Settings | None) -> None:
    """Pin S3 settings for this process (Ray workers get the driver's settings this way)."""
    global _settings_override
    _settings_override = settings


def current_s3_settings() -> S3Settings:
    return _settings_override if _settings_override is not None else S3Settings.from_env()


def _client():
    settings = current_s3_settings()
    client = _clients.get(settings)
    if client is None:
        import boto3
        from botocore.config import Config

        # Path-style addressing whenever a custom endpoint is set: local and on-prem S3 servers
        # (rclone, MinIO, Ceph) rarely have wildcard DNS for virtual-hosted buckets.
        style = "path" if settings.endpoint_url else "auto"
        config = Config(
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            s3={"addressing_style": style},
            connect_timeout=10,
            read_timeout=60,
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            region_name=settings.region or "us-east-1",
            config=config,
        )
        _clients[settings] = client
    return client


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


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url!r} has no bucket name: write it as s3://BUCKET/PREFIX")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URL path components with '/' (os.path.join would break s3:// keys on Windows-style logic)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ---------------------------------------------------------------------------------------------
# Error translation and retries


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "AuthorizationHeaderMalformed", "403"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "RequestTimeTooSkewed", "500", "502", "503", "504"}


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, \
        ReadTimeoutError, ResponseStreamingError

    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "") in _TRANSIENT_CODES
    return isinstance(exc, (BotoConnectionError, ReadTimeoutError, ResponseStreamingError,
                            ConnectionError, TimeoutError))


def _explain(exc: BaseException, url: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = current_s3_settings().endpoint_url or "AWS default endpoint"
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint {endpoint} for {url}: check "
                            f"AWS_ENDPOINT_URL and that the server is running")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"S3 at {endpoint} rejected the credentials for {url} ({code}): "
                                f"check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if code == "NoSuchBucket":
            bucket = split_s3(url)[0]
            return StorageError(f"bucket {bucket!r} does not exist at {endpoint}: create it first "
                                f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL {url}")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return StorageNotFound(f"{url} does not exist")
        return StorageError(f"S3 error {code} for {url} at {endpoint}: "
                            f"{exc.response.get('Error', {}).get('Message', '')}")
    if _is_transient(exc):
        return StorageError(f"S3 at {endpoint} kept failing for {url} after "
                            f"{current_s3_settings().max_attempts} attempts: {exc}")
    return StorageError(f"S3 failure for {url}: {type(exc).__name__}: {exc}")


def with_retries(operation: Callable[[], T], *, what: str, attempts: int | None = None,
                 base_delay: float = 0.2, max_delay: float = 5.0,
                 is_transient: Callable[[BaseException], bool] = _is_transient) -> T:
    """Run `operation`, retrying transient failures with capped exponential backoff and full jitter.

    botocore already retries single requests; this outer loop also covers failures in the middle
    of a streamed body and whole-endpoint outages that outlast botocore's short budget.
    """
    attempts = attempts or current_s3_settings().max_attempts
    for attempt in range(attempts):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised with an explanation
            if not is_transient(exc) or attempt == attempts - 1:
                raise _explain(exc, what) from exc
            time.sleep(random.uniform(0, min(max_delay, base_delay * 2 ** attempt)))
    raise AssertionError("unreachable")


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
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
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
