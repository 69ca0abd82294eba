"""The storage layer against a real S3 server (rclone) and the local filesystem."""
from __future__ import annotations

import os

import pytest

from core import storage

from botocore.exceptions import EndpointConnectionError


def test_local_write_is_atomic_and_listing_globs(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "x.py"), b"print(1)\n")
    storage.write_bytes(f"file://{tmp_path}/a/b/y.txt", b"hello")
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "x.py"]  # no temp files left behind
    assert storage.read_bytes(str(tmp_path / "a" / "x.py")) == b"print(1)\n"
    assert storage.list_files(str(tmp_path / "a"), "*.py") == [f"{tmp_path}/a/x.py"]
    with pytest.raises(storage.StorageNotFound, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing"))


def test_s3_round_trip_with_multipart_upload(s3_env):
    big = os.urandom(storage.MULTIPART_THRESHOLD_BYTES + 1024 * 1024)  # forces two parts
    url = "s3://corpora/storage-test/big.bin"
    parts = []
    storage._client().meta.events.register("after-call.s3.UploadPart",
                                            lambda **kw: parts.append(kw["http_response"].status_code))
    storage.write_bytes(url, big)
    assert parts == [200, 200]  # real multipart: two UploadPart requests
    assert storage.read_bytes(url) == big
    assert storage.stat(url).size == len(big)
    storage.write_bytes("s3://corpora/storage-test/sub/small.txt", b"x")
    assert storage.list_files("s3://corpora/storage-test", "*.txt") == [
        "s3://corpora/storage-test/sub/small.txt"]
    assert (s3_env.root / "corpora" / "storage-test" / "big.bin").read_bytes() == big


def test_wrong_secret_and_missing_bucket_give_clear_errors(s3_env):
    storage.use_s3_settings(storage.S3Settings(endpoint_url=s3_env.endpoint,
                                               access_key_id="mmrec-test-key",
                                               secret_access_key="wrong-secret"))
    try:
        with pytest.raises(storage.StorageError, match="rejected the credentials.*AWS_SECRET"):
            storage.check_writable_location("s3://corpora/x")
    finally:
        storage.use_s3_settings(None)
    with pytest.raises(storage.StorageError, match="bucket 'nobucket' does not exist"):
        storage.check_writable_location("s3://nobucket/x")
    with pytest.raises(storage.StorageNotFound):
        storage.read_bytes("s3://corpora/no/such/key")


def test_max_attempts_comes_from_aws_max_attempts_and_bad_values_are_named(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage.S3Settings.from_env().max_attempts == 6
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.S3Settings.from_env().max_attempts == 2
    assert "AWS_MAX_ATTEMPTS" in storage.forwarded_env()  # Ray workers retry as the driver does
    for bad in ("0", "three", "-1"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", bad)
        with pytest.raises(storage.StorageError, match=f"AWS_MAX_ATTEMPTS='{bad}' is not a positive whole number"):
            storage.S3Settings.from_env()


def test_retries_transient_errors_with_backoff():
    # A fault injected on purpose: a real server cannot be made to drop exactly two requests.
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert storage.with_retries(flaky, what="s3://b/k", attempts=4, base_delay=0.01) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.with_retries(lambda: flaky() and flaky() and flaky(), what="s3://b/k",
                             attempts=2, base_delay=0.01)
