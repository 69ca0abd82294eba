"""The cluster path on a real S3 server (SeaweedFS on loopback, stopped by PID): data, checkpoints,
exports and records all under s3://, for prep, training (both engines), the pipeline and generate.

The one forced timing in this file is in the server-outage test, which stops the real server at the
moment the loop starts writing a checkpoint (a hook on the storage layer picks the moment; the
outage itself is real): no real component can fail at an exact point of a protocol on demand.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from core import storage
from core.config import resolve
from mmrec.train import Trainer
from mmrec.train.checkpoint import list_checkpoints
from mmrec.train.records import read_records
from tests.faults.conftest import SMALL, launch
from tests.support.s3server import S3_ENV_VARS
from tests.support.synthetic_data import write_synthetic_dataset

pytestmark = pytest.mark.slow
SEQ_LEN = 16


@pytest.fixture
def s3(new_s3_server, monkeypatch):
    """A private server whose variables are this process's (and its children's) S3 settings."""
    server = new_s3_server()
    for key in S3_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    storage.use_s3_settings(None)
    return server


def upload_dataset(tmp_path, url: str) -> str:
    write_synthetic_dataset(tmp_path / "data", seq_len=SEQ_LEN, train_samples=48, val_samples=8)
    storage.upload_dir(tmp_path / "data", url)
    return storage.join(url, "manifest.json")


def config(manifest: str, runs: str, **sections):
    values = {
        "model": {"name": "tiny", "d_model": 32, "n_layers": 2, "ffn_dim": 64, "n_heads": 2},
        "train": dict(seq_len=SEQ_LEN, micro_batch_size=2, max_steps=6, warmup_steps=1, eval_every=3, eval_batches=1,
                      checkpoint_every=2, log_every=1, precision="fp32"),
        "data": {"manifest": manifest}, "run": {"storage_path": runs},
    }
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes}
    return resolve(values, stage="stage1")


def losses(run_url: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(run_url) if r["kind"] == "train"]


def test_the_smoke_pipeline_runs_with_everything_on_s3(s3, tmp_path):
    out = f"s3://{s3.bucket}/smoke"
    ran = launch("launchers.pipeline", "--out", out, "--set", 'prep.sources=["demo?max_mb=0.6"]',
                 "--set", "prep.vocab_size=512", "--set", "prep.val_fraction=0.25", "--set", "train.max_steps=12", "--set", "train.eval_every=6",
                 "--set", "train.checkpoint_every=6", "--set", "pipeline.enforce_checks=false",
                 "--set", "pipeline.eval_batches=2",
                 # One worker per stage and a head of 4 logical CPUs: the two stage-2 jobs run side by side
                 # (the path make smoke's 2-CPU head never takes); two workers' ZeRO-2 checkpoint parts on S3
                 # are the killed-worker test's.
                 "--set", "scaling.num_workers=1", "--set", "pipeline.num_cpus=4", timeout=1500)
    assert ran.code == 0, ran.text[-4000:]
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert set(report["stages"]) == {"stage1", "stage2-text", "stage2-code", "stage3"}
    assert "stage2-text and stage2-code run side by side" in ran.text
    assert set(report["evaluation"]) >= {"base", "text expert", "code expert", "fused", "oracle-routed experts"}
    assert report["sample"]["text"]
    for stage in report["stages"]:
        run = f"{out}/stages/{stage}"
        steps = [s for s, _ in losses(run)]  # logged steps: the first, every train.log_every, the last
        assert list_checkpoints(run) and steps[0] == 1 and steps[-1] == 12
        assert storage.exists(f"{run}/exports/latest") and storage.exists(f"{run}/metrics.jsonl")
    # The later stages started from the earlier ones' exports on S3 (run:<name> through the pointers).
    stage3 = json.loads(storage.read_text(f"{out}/stages/stage3/{list_checkpoints(f'{out}/stages/stage3')[0]}/run.json"))
    assert stage3["config"]["run"]["init_from_text"] == "run:stage2-text"
    assert storage.exists(f"{out}/data/manifest.json") and storage.exists(f"{out}/report.png")
    assert not (tmp_path / "smoke").exists()


def test_a_killed_worker_restarts_from_its_s3_checkpoint_with_the_same_losses(s3, tmp_path):
    from cluster import run_stage
    from cluster.ray_head import LocalRayHead
    from tests.cluster.conftest import REPO

    manifest = upload_dataset(tmp_path, f"s3://{s3.bucket}/data")
    runs = f"s3://{s3.bucket}/runs"
    common = dict(engine={"kind": "deepspeed", "zero_stage": 2}, scaling={"num_workers": 2},
                  train={"micro_batch_size": 4, "checkpoint_every": 2, "eval_every": 0})
    with LocalRayHead(2, tmp_path / "head.log", env={"PYTHONPATH": str(REPO)}) as head:
        os.environ["RAY_ADDRESS"] = head.gcs
        try:
            clean = run_stage(config(manifest, runs, **common, run={"name": "clean", "record_sample_digests": True}))
            killed = run_stage(config(manifest, runs, **common, run={"name": "killed", "record_sample_digests": True},
                                      fault={"kill_at_step": 4}))
        finally:
            os.environ.pop("RAY_ADDRESS", None)
            import ray

            ray.shutdown()
    assert storage.exists(f"{runs}/killed/injected_faults/kill-step4")
    got, want = read_records(killed.run_url), read_records(clean.run_url)
    train = [r for r in got if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    for a, b in zip(train, [r for r in want if r["kind"] == "train"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["samples"] == b["samples"]


@pytest.mark.parametrize("what", ["wrong secret", "missing bucket", "unreachable endpoint"])
def test_storage_problems_are_named_before_any_training_step(s3, tmp_path, what):
    manifest = upload_dataset(tmp_path, f"s3://{s3.bucket}/data")
    env = dict(s3.env())
    runs = f"s3://{s3.bucket}/runs"
    if what == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expected = ["rejected the credentials", "AWS_SECRET_ACCESS_KEY"]
    elif what == "missing bucket":
        runs = "s3://no-such-bucket/runs"
        expected = ["bucket 'no-such-bucket' does not exist"]
    else:
        from cluster.ray_head import free_port

        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        env["AWS_MAX_ATTEMPTS"] = "2"  # refused connections are retried: a short budget, honoured, keeps this quick
        expected = ["cannot reach the S3 endpoint", "AWS_ENDPOINT_URL"]
    args = ["--stage", "stage1", "--set", f"data.manifest={manifest}", "--set", f"run.storage_path={runs}",
            "--set", f"train.seq_len={SEQ_LEN}", "--set", "train.micro_batch_size=2", *SMALL]
    started = time.monotonic()
    train = launch("launchers.train", *args, env=env, timeout=300)
    prep = launch("launchers.prep", "--source", "demo?max_mb=0.1", "--out", runs.replace("/runs", "/prep"),
                  "--no-progress", env=env, timeout=300)
    for ran in (train, prep):
        assert ran.code == 2 and "Traceback" not in ran.text, ran.text[-3000:]
        assert all(needle in ran.err for needle in expected), ran.err
        assert "step 1/" not in ran.out
    assert time.monotonic() - started < 240


@pytest.mark.parametrize("server_back", ["after the run failed", "while the upload retries"])
def test_an_s3_outage_during_a_checkpoint_never_leaves_a_checkpoint_taken_as_complete(s3, tmp_path, monkeypatch,
                                                                                     server_back):
    manifest = upload_dataset(tmp_path, f"s3://{s3.bucket}/data")
    runs = f"s3://{s3.bucket}/runs"
    clean = Trainer(config(manifest, runs, run={"name": "clean"})).fit()
    cfg = config(manifest, runs, run={"name": "outage"})
    real_write = storage.write_bytes
    state = {"stopped": False}

    def write_bytes(url: str, data: bytes) -> None:
        # The moment: run.json of the step-4 checkpoint, after its engine state and before its markers.
        if not state["stopped"] and "/outage/step_00000004-" in url and url.endswith("/run.json"):
            state["stopped"] = True
            s3.kill()
            if server_back == "while the upload retries":
                threading.Timer(1.0, s3.start).start()
        real_write(url, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    if server_back == "after the run failed":
        with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
            Trainer(cfg).fit()
        s3.start()
        with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004"):
            resumed = Trainer(cfg).fit()
        assert "/step_00000002-" in resumed.resumed_from  # the torn step-4 checkpoint was not taken
    else:
        Trainer(cfg).fit()  # the upload's retries outlast the outage
    assert state["stopped"]
    assert losses(storage.join(runs, "outage")) == losses(clean.run_url)


@pytest.mark.parametrize("endpoint_var", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_session_tokens_and_both_endpoint_variables_work_for_prep_training_and_export(s3, tmp_path, endpoint_var):
    env = {key: "" for key in S3_ENV_VARS}
    env.update(s3.env(endpoint_var=endpoint_var, temporary=True))
    assert env["AWS_SESSION_TOKEN"]
    data, runs = f"s3://{s3.bucket}/tok/data", f"s3://{s3.bucket}/tok/runs"
    prep = launch("launchers.prep", "--source", "demo?max_mb=0.2", "--out", data, "--vocab-size", "512",
                  "--seq-len", str(SEQ_LEN), "--set", "prep.val_fraction=0.1", "--no-progress", env=env, timeout=600)
    assert prep.code == 0, prep.text[-3000:]
    train = launch("launchers.train", "--stage", "stage1", "--set", f"data.manifest={data}/manifest.json",
                   "--set", f"run.storage_path={runs}", "--set", f"train.seq_len={SEQ_LEN}",
                   "--set", "train.micro_batch_size=2", "--set", "train.max_steps=3", "--set", "train.warmup_steps=1",
                   "--set", "train.eval_every=3", "--set", "train.eval_batches=1", *SMALL, env=env, timeout=600)
    assert train.code == 0, train.text[-3000:]
    generated = launch("launchers.generate", "--export", "run:stage1", "--set", f"run.storage_path={runs}",
                       "--prompt", "the", "--max-new-tokens", "5", "--seed", "0", env=env, timeout=300)
    assert generated.code == 0 and generated.out.startswith("the"), generated.text[-3000:]
    # Without the session token the same temporary keys are refused: the token really was used.
    no_token = {**env, "AWS_SESSION_TOKEN": ""}
    refused = launch("launchers.generate", "--export", "run:stage1", "--set", f"run.storage_path={runs}",
                     "--prompt", "the", env=no_token, timeout=300)
    assert refused.code == 2 and "rejected the credentials" in refused.err, refused.text[-2000:]
