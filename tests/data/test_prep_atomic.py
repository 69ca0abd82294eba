"""A prep run publishes a dataset atomically: interrupted or killed at any point, the dataset that
was there before is intact and trains; the next run resumes, publishes and collects what no manifest
names. Real processes and real signals: a driver process runs datasets_prep.prepare and holds
still at a named point of the run (a logging handler on the `prep_event` that prep logs there),
the test signals it there, then checks the output directory.

Every process started here runs Ray with its own RAY_TMPDIR, in which a stale session file names
a closed port: prep must start a local instance of its own rather than join that.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core import storage
from core.manifest import (TokenizerMismatchError, load_manifest, load_manifest_tokenizer,
                           manifest_dir, read_tokenizer_bytes)
from core.shards import read_shard, sha256_hex
from datasets_prep import prepare
from mmrec.data import ShardLoader

REPO = Path(__file__).parents[2]
OLD = dict(vocab_size=480, seq_len=16, shard_mb=0.01, partition_mb=0.05, val_fraction=0.1,
           tokenizer_sample_mb=0.5, progress=False)
NEW = dict(OLD, seq_len=24, vocab_size=420)  # the re-run: every shard and the tokenizer differ

# Runs prepare(**json) in its own process; at the prep_event named by argv[1] it writes the log
# message to the file argv[2] and waits there for the test's signal.
DRIVER = r"""
import faulthandler, json, logging, os, signal, sys, time
from datasets_prep import prepare

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack on a hang
# Python keeps SIGINT ignored when it starts ignored, as it does under a shell's background job (`make
# test &`, nohup): the driver stands for an interactive prep, which Ctrl-C interrupts.
signal.signal(signal.SIGINT, signal.default_int_handler)

stop_at, marker, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

class HoldAt(logging.Handler):
    def emit(self, record):
        if getattr(record, "prep_event", None) == stop_at:
            with open(marker + ".tmp", "w") as f:
                f.write(record.getMessage())
            os.replace(marker + ".tmp", marker)
            while True:
                time.sleep(0.05)

prep_log = logging.getLogger("datasets_prep")
prep_log.setLevel(logging.DEBUG)
prep_log.addHandler(HoldAt())
console = logging.StreamHandler()
console.setLevel(logging.INFO)
logging.getLogger().addHandler(console)
print(prepare(**args), flush=True)
"""


def _corpus(root: Path) -> str:
    """Code and prose with a vocabulary rich enough for the tokenizer sizes used here."""
    syllables = ["ka", "lo", "mi", "ter", "vos", "un", "dra", "pel", "six", "qua", "ren", "bo"]

    def word(n: int) -> str:
        return "".join(syllables[(n // 12 ** k) % 12] for k in range(1 + n % 3))

    root.mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(400):
            name = word(i * 7 + 3)
            f.write(json.dumps({"text": f"def {name}_{i}(x):\n    return x * {i}  # {word(i)}\n",
                                "domain": "code"}) + "\n")
            prose = " ".join(word(i * 13 + k) for k in range(12))
            f.write(json.dumps({"text": f"Paragraph {i}: {prose}.\nThe quick brown fox, café {i}.",
                                "domain": "text"}) + "\n")
    return f"jsonl:{root}"


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """A corpus and a finished dataset prepared from it with OLD: (source, dataset dir)."""
    root = tmp_path_factory.mktemp("atomic")
    source = _corpus(root / "corpus")
    prepare(source, out=str(root / "finished"), **OLD)
    return source, root / "finished"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_env(tmp_path):
    """Environment of a process that starts its own Ray: a private RAY_TMPDIR (short: Ray's unix
    sockets live under it) holding a stale session file that names a closed port."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _files(out: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file (a temporary file renamed away meanwhile is skipped:
    the Ray tasks of a held run may still be writing)."""
    files = {}
    for path in sorted(out.rglob("*")):
        try:
            files[str(path.relative_to(out))] = path.read_bytes()
        except (IsADirectoryError, FileNotFoundError):
            pass
    return files


def _session(pid: int) -> list[int]:
    """Live processes of the session the driver `pid` leads (it and everything it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _end_session(pid: int, timeout: float) -> list[int]:
    """Wait for the session of `pid` to empty; what is still there after `timeout` is SIGKILLed
    (by PID) and returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _session(pid):
            return []
        time.sleep(0.1)
    left = _session(pid)
    for other in left:
        try:
            os.kill(other, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _session(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


class Driver:
    """A prep run in its own process (session), held at a prep_event until signalled."""

    def __init__(self, tmp_path: Path, env: dict, source: str, out: Path, stop_at: str, options):
        self.marker = tmp_path / f"at-{stop_at}"
        self.log = tmp_path / f"driver-{stop_at}.log"
        args = dict(source=source, out=str(out), **options)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", DRIVER, stop_at, str(self.marker), json.dumps(args)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_held(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"prep did not reach its stop point (exit {self.process.returncode}):\n"
                            f"{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        return self.marker.read_text()

    def signal(self, sig: int, timeout: float = 90) -> int:
        os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Where it hangs: every thread's Python stack into the log (faulthandler, DRIVER), then end it.
            os.kill(self.process.pid, signal.SIGUSR1)
            time.sleep(2)
            self.kill()
            pytest.fail(f"prep ignored {signal.Signals(sig).name} for {timeout} s:\n"
                        f"{self.log.read_text()[-12000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        _end_session(self.process.pid, 0)


@pytest.fixture
def start_driver(tmp_path, ray_env):
    """start_driver(source, out, stop_at, options) -> a Driver; whatever is left of it (a failed
    test's held run, Ray's agents) is ended by PID when the test ends."""
    drivers = []

    def start(source: str, out: Path, stop_at: str, options: dict) -> Driver:
        drivers.append(Driver(tmp_path, ray_env, source, out, stop_at, options))
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.kill()


def check_dataset(manifest_url: str, seq_len: int) -> None:
    """The dataset a manifest describes is whole and trains: every shard it names verifies
    (sha256), its tokenizer is the one it was cut with, and batches come out of ShardLoader."""
    manifest = load_manifest(manifest_url)
    assert manifest.seq_len == seq_len
    root = manifest_dir(manifest_url)
    for shard in manifest.shards:
        rows = read_shard(storage.read_bytes(storage.join(root, shard.path)), name=shard.path,
                          expected_sha256=shard.sha256, expected_samples=shard.samples,
                          sample_tokens=seq_len + 1)
        assert rows.shape == (shard.samples, seq_len + 1)
    tokenizer = load_manifest_tokenizer(manifest_url)
    loader = ShardLoader(manifest_url, ["text", "code"], micro_batch_size=4, infinite=False,
                         prefetch=False)
    batches = [batch for _, batch in zip(range(3), loader)]
    assert len(batches) == 3
    for batch in batches:
        assert tuple(batch["tokens"].shape) == (4, seq_len + 1)
        assert int(batch["tokens"].max()) < tokenizer.vocab_size
    text = "".join(tokenizer.decode(row.tolist()) for batch in batches for row in batch["tokens"])
    assert "x * " in text or "Paragraph" in text  # real corpus text comes back


def _assert_collected(out: Path) -> None:
    """Only the published dataset is left: what the manifest names, its tokenizer's metadata."""
    manifest = load_manifest(str(out / "manifest.json"))
    meta = manifest.tokenizer_path.replace("tokenizer.model", "tokenizer.json")
    assert set(_files(out)) == {"manifest.json", meta, *manifest.paths}


# ---------------------------------------------------------------------------------------------


# Each case starts a Ray instance of its own (about 10 s here): two run in the fast suite, the rest
# with the slow tests.
POINTS = [
    pytest.param("tokenizer", signal.SIGINT, id="tokenizer-SIGINT"),
    pytest.param("shard", signal.SIGKILL, id="shards-SIGKILL"),
    pytest.param("tokenizer", signal.SIGKILL, id="tokenizer-SIGKILL", marks=pytest.mark.slow),
    pytest.param("tokenizer", signal.SIGTERM, id="tokenizer-SIGTERM", marks=pytest.mark.slow),
    pytest.param("shard", signal.SIGTERM, id="shards-SIGTERM", marks=pytest.mark.slow),
    pytest.param("shard", signal.SIGINT, id="shards-SIGINT", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("stop_at, sig", POINTS)
def test_interrupted_rerun_leaves_the_old_dataset_whole(finished, start_driver, tmp_path, stop_at,
                                                        sig):
    source, finished_dir = finished
    out = tmp_path / "data"
    shutil.copytree(finished_dir, out)
    before = _files(out)
    manifest_url = str(out / "manifest.json")

    driver = start_driver(source, out, stop_at, NEW)
    held = driver.wait_until_held()
    # Held where asked: after the new tokenizer was stored / after a new shard was written.
    new_files = set(_files(out)) - set(before)
    assert any(name.startswith("tokenizers/") and name.endswith("tokenizer.model")
               for name in new_files), (held, new_files)
    if stop_at == "shard":
        assert any(name.endswith(".tar") for name in new_files), new_files
    returncode = driver.signal(sig)
    assert returncode != 0
    # A clean stop takes Ray down with it. After SIGKILL, Ray's own fate-sharing stops its
    # workers, but its dashboard and runtime-env agents linger for a minute: those are ended here.
    left = _end_session(driver.process.pid, 30 if sig != signal.SIGKILL else 5)
    if sig != signal.SIGKILL:
        assert left == [], f"processes left after {signal.Signals(sig).name}: {left}"

    # The old dataset: the same manifest, every file it names untouched, and it still trains.
    after = _files(out)
    assert after["manifest.json"] == before["manifest.json"]
    assert {name: after.get(name) for name in before} == before
    check_dataset(manifest_url, OLD["seq_len"])

    # The next run with the new settings resumes (shards already written are not written again),
    # publishes, and deletes everything no manifest names, the dead run's registration included.
    kept = {name: (out / name).stat().st_mtime_ns for name in set(after) - set(before)
            if name.endswith(".tar")}
    assert prepare(source, out=str(out), **NEW) == manifest_url
    check_dataset(manifest_url, NEW["seq_len"])
    _assert_collected(out)
    assert {name: (out / name).stat().st_mtime_ns for name in kept if (out / name).exists()} == kept


@pytest.mark.slow
def test_killed_after_publishing_leaves_the_new_dataset_whole(finished, start_driver, tmp_path):
    source, finished_dir = finished
    out = tmp_path / "data"
    shutil.copytree(finished_dir, out)
    before = _files(out)
    driver = start_driver(source, out, "published", NEW)
    driver.wait_until_held()
    driver.signal(signal.SIGKILL)
    _end_session(driver.process.pid, 5)
    # Published but not yet collected: the new manifest rules, the old files are still there.
    check_dataset(str(out / "manifest.json"), NEW["seq_len"])
    assert set(before) - {"manifest.json"} <= set(_files(out))
    prepare(source, out=str(out), **NEW)
    _assert_collected(out)


@pytest.mark.slow
def test_a_live_run_keeps_its_files_from_another_runs_collection(finished, start_driver,
                                                                 tmp_path):
    """Run A is held after storing its tokenizer; run B publishes meanwhile. B must not delete
    A's files (no manifest names them yet); once A is gone, the next run collects them."""
    source, finished_dir = finished
    out = tmp_path / "data"
    shutil.copytree(finished_dir, out)
    other = dict(NEW, vocab_size=360)  # A's own tokenizer
    driver = start_driver(source, out, "tokenizer", other)
    driver.wait_until_held()
    a_files = set(_files(out))
    prepare(source, out=str(out), **NEW)
    check_dataset(str(out / "manifest.json"), NEW["seq_len"])
    assert a_files - {"manifest.json"} <= set(_files(out))  # A's (and the old) files kept
    driver.signal(signal.SIGTERM)
    _end_session(driver.process.pid, 30)
    prepare(source, out=str(out), **NEW)
    _assert_collected(out)


@pytest.mark.slow
def test_interrupted_launcher_leaves_a_whole_dataset(finished, ray_env, tmp_path):
    """The real CLI, interrupted as soon as it writes its first new shard: whichever moment the
    signal lands, the output holds one whole dataset, the old one or the new one."""
    source, finished_dir = finished
    out = tmp_path / "data"
    shutil.copytree(finished_dir, out)
    before = _files(out)
    command = [sys.executable, "-m", "launchers.prep", "--source", source, "--out", str(out),
               "--vocab-size", str(NEW["vocab_size"]), "--seq-len", str(NEW["seq_len"]),
               "--shard-mb", str(NEW["shard_mb"]), "--partition-mb", str(NEW["partition_mb"]),
               "--val-fraction", str(NEW["val_fraction"]),
               "--tokenizer-sample-mb", str(NEW["tokenizer_sample_mb"]), "--no-progress"]
    with open(tmp_path / "cli.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=ray_env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(name.endswith(".tar") for name in set(_files(out)) - set(before)):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
        process.wait(60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        _end_session(process.pid, 30)
    manifest = load_manifest(str(out / "manifest.json"))
    if manifest.seq_len == OLD["seq_len"]:
        assert _files(out)["manifest.json"] == before["manifest.json"]
    check_dataset(str(out / "manifest.json"), manifest.seq_len)


def test_republishing_on_s3_replaces_the_version_and_collects_the_old_one(finished, s3_env,
                                                                         tmp_path):
    source, _ = finished
    out = f"s3://corpora/atomic-{tmp_path.name}"
    manifest_url = prepare(source, out=out, **OLD)
    old = load_manifest(manifest_url)
    storage.write_bytes(f"{out}/README.txt", b"the user's own file")
    storage.write_bytes(f"{out}/code/notes.txt", b"also the user's")
    assert prepare(source, out=out, **NEW) == manifest_url
    check_dataset(manifest_url, NEW["seq_len"])
    new = load_manifest(manifest_url)
    assert not set(old.paths) & set(new.paths)
    listed = {url[len(out) + 1:] for url in storage.list_files(out)}
    meta = new.tokenizer_path.replace("tokenizer.model", "tokenizer.json")
    assert listed == {"manifest.json", meta, "README.txt", "code/notes.txt", *new.paths}


# ---------------------------------------------------------------------------------------------
# The reading side: the manifest's tokenizer hash


def test_tokenizer_named_by_a_manifest_is_verified(finished, tmp_path):
    _, finished_dir = finished
    out = tmp_path / "data"
    shutil.copytree(finished_dir, out)
    manifest_url = str(out / "manifest.json")
    manifest = load_manifest(manifest_url)
    model = out / manifest.tokenizer_path
    assert sha256_hex(read_tokenizer_bytes(manifest_url)) == manifest.tokenizer_sha256

    # swapped or damaged (one bit): both hashes named, nothing loads
    original = model.read_bytes()
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(TokenizerMismatchError) as raised:
        load_manifest_tokenizer(manifest_url)
    message = str(raised.value)
    assert f"{manifest.tokenizer_sha256[:16]}" in message and "replaced or damaged" in message
    assert sha256_hex(model.read_bytes())[:16] in message

    model.unlink()
    with pytest.raises(TokenizerMismatchError, match="does not exist: the dataset is incomplete"):
        load_manifest_tokenizer(manifest_url)

    # the right file, but the manifest claims another vocabulary: also refused
    model.write_bytes(original)
    data = json.loads(Path(manifest_url).read_text())
    data["vocab_size"] += 1
    data.pop("fingerprint")
    Path(manifest_url).write_text(json.dumps(data))
    with pytest.raises(TokenizerMismatchError, match=rf"says vocab_size={manifest.vocab_size + 1}"):
        load_manifest_tokenizer(manifest_url)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds a JSON list, not a manifest object"),
    ("{not json", "is not valid JSON"),
])
def test_malformed_manifest_is_named(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_manifest(str(tmp_path / "manifest.json"))


def test_manifest_shard_entry_with_an_unknown_key_is_named(finished, tmp_path):
    _, finished_dir = finished
    data = json.loads((finished_dir / "manifest.json").read_text())
    data["shards"][1]["extra"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"shard entry 1 has unknown keys \['extra'\]"):
        load_manifest(str(tmp_path / "manifest.json"))
