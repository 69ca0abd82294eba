"""S3 through boto3: the connection settings (the standard AWS variables), the client, the retries and the
errors a user can act on. core.storage builds every s3:// operation on this; nothing else talks to S3.

The settings come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION /
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 (before AWS_ENDPOINT_URL) and AWS_MAX_ATTEMPTS; `forwarded_env()` lists them for
Ray jobs and workers, and `pyarrow_filesystem()` hands Ray Train's checkpoint upload a filesystem
built from the same settings. Failures a user can fix (wrong credentials, missing bucket,
unreachable endpoint, missing object) become StorageError with a message saying what to do.
"""
from __future__ import annotations

import dataclasses
import os
import random
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
            max_attempts=_max_attempts(env.get("AWS_MAX_ATTEMPTS")),
        )

    def __repr__(self) -> str:  # never print secrets into logs
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


def _max_attempts(raw: str | None) -> int:
    """AWS_MAX_ATTEMPTS as the AWS SDKs read it: attempts per request, the first one included."""
    if not raw:
        return DEFAULT_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS={raw!r} is not a positive whole number: it is the number of attempts "
                           f"per S3 request (unset means {DEFAULT_ATTEMPTS}); fix or unset it")
    return value


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
            connect_timeout=5,
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


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url!r} has no bucket name: write it as s3://BUCKET/PREFIX")
    return bucket, key



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
                            f"AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the server is running")
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
# Handing the same settings to Ray


FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS",
)


def forwarded_env() -> dict[str, str]:
    """The AWS variables set in this process, to pass on to Ray jobs and Train workers."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path inside it) for Ray Train's RunConfig, from this layer's settings."""
    import pyarrow.fs as pafs

    if not url.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(url.removeprefix("file://"))
    settings = current_s3_settings()
    options: dict = dict(
        access_key=settings.access_key_id, secret_key=settings.secret_access_key,
        session_token=settings.session_token, region=settings.region or "us-east-1",
        # Path-style addressing: S3 servers outside AWS rarely serve bucket subdomains.
        force_virtual_addressing=False,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    )
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**options), url.removeprefix("s3://").rstrip("/")
