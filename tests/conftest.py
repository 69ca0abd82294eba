"""Suite-wide settings and the S3 server fixtures. Other area fixtures live in each
tests/<area>/conftest.py."""
import os

import pytest

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. This must
# be set before any kernel module is imported, which is why it lives at the top of the suite.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Local Ray clusters: a later `ray start` after an in-process ray.init would otherwise turn on
# token auth and break `ray job submit`.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# ---------------------------------------------------------------------------------------------
# S3: one real server (SeaweedFS `weed mini`, tests/support/s3server.py) for the whole session,
# plus private servers for tests that stop, kill or restart theirs.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 server (bucket `corpora`), started once on free loopback ports.

    Tests must not stop it; a test that needs to stop or restart a server uses new_s3_server.
    """
    from tests.support.s3server import S3ServerError, SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except (FileNotFoundError, S3ServerError) as exc:
        server.stop()
        pytest.fail(f"cannot start the test S3 server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """The session server's variables (AWS_ENDPOINT_URL + static keys) in os.environ for the
    whole session; Ray tasks get them from there."""
    from core import storage
    from tests.support.s3server import S3_ENV_VARS

    saved = {key: os.environ.get(key) for key in S3_ENV_VARS}
    for key in S3_ENV_VARS:
        os.environ.pop(key, None)
    os.environ.update(s3_server.env())
    storage.use_s3_settings(None)
    yield s3_server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def new_s3_server(tmp_path_factory):
    """new_s3_server(bucket="corpora") -> a started private SeaweedS3 that the test may stop,
    kill, pause and start again (same ports, same data); stopped at the end of the test."""
    from tests.support.s3server import SeaweedS3

    servers = []

    def start(bucket: str = "corpora"):
        servers.append(SeaweedS3(tmp_path_factory.mktemp("seaweedfs-own"), bucket=bucket))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()
