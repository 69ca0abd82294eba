"""The whole run, one job per stage: prep -> stage1 -> stage2-text + stage2-code -> stage3 -> eval -> sample.

    run_pipeline(PipelineConfig())          # the CPU smoke run (`python -m launchers.pipeline`)

Prep and every stage are submitted as Ray jobs (the same `python -m launchers.train ...` a user would pass to
`ray job submit`), to the cluster at `address` or to a local head this function starts with
`ray start --head --block` and stops afterwards. The two stage-2 jobs run side by side when the
cluster has CPUs for both. At the end the exports are evaluated on the validation split: each
stage-2 expert must have a lower loss than the base on its own domain, else PipelineCheckFailed.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import checkpoints
from cluster.config import load_job_config

REPO_ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WORKER_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\) ")


class PipelineCheckFailed(RuntimeError):
    """A stage finished but did not do what the pipeline requires (e.g. stage 2 did not beat the base)."""


@dataclass(frozen=True)
class PipelineConfig:
    out: str = "runs/smoke"  # data, stage checkpoints and logs go under here
    sources: tuple[str, ...] = ("demo?max_mb=4",)
    vocab_size: int = 2048
    config: str = str(REPO_ROOT / "configs" / "smoke.toml")  # the job config every stage starts from
    overrides: tuple[str, ...] = ()  # section.key=value applied to every stage
    stage_overrides: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "stage2-text": ("train.lr=2e-3",), "stage2-code": ("train.lr=2e-3",),
    })
    address: str = ""  # a Ray dashboard URL (http://host:8265); empty: start a local head for the run
    num_cpus: int = 2  # CPUs of the local head
    eval_batches: int = 8
    prompt: str = "def "
    sample_tokens: int = 60

    def __post_init__(self) -> None:
        # Fail before any job starts: every stage's config must validate.
        for stage in ("stage1", "stage2-text", "stage2-code", "stage3"):
            load_job_config(self.config, stage=stage, overrides=[*self._fillers(stage), *self.overrides, *self.stage_overrides.get(stage, ())])

    @staticmethod
    def _fillers(stage: str) -> list[str]:
        fillers = ["data.manifest=<prepared>"]
        if stage.startswith("stage2-"):
            fillers.append("run.init_from=<stage1>")
        if stage == "stage3":
            fillers += ["run.init_from_text=<text>", "run.init_from_code=<code>"]
        return fillers


def log(line: str) -> None:
    print(f"[pipeline] {line}", flush=True)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for servers this machine starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead:
    """`ray start --head --block` as a child process; stopped by its PID (process group) on exit."""

    def __init__(self, num_cpus: int, log_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.num_cpus, self.log_path, self.extra_env = num_cpus, log_path, env or {}
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalRayHead:
        ray_bin = Path(sys.executable).with_name("ray")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.env = {**os.environ, **self.extra_env, "RAY_AUTH_MODE": "disabled"}
        self.process = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={self.gcs.rsplit(':', 1)[1]}", f"--num-cpus={self.num_cpus}",
             "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", "--disable-usage-stats"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while subprocess.run([str(ray_bin), "status", f"--address={self.gcs}"], capture_output=True, env=self.env).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the local Ray head did not start; see {self.log_path}")
            time.sleep(1)
        from ray.job_submission import JobSubmissionClient

        while True:  # the dashboard's job API comes up a little after the GCS
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise
                time.sleep(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class JobRunner:
    """Submits `python -m launchers.X` entrypoints as Ray jobs and streams their logs.

    ship_code: upload the repository as the job's working_dir (a remote cluster). A head started by
    this machine reads the code where it is, through PYTHONPATH, which also sidesteps Ray dropping a
    shared working_dir package between two jobs (RuntimeEnvSetupError). Jobs that fail while setting
    up their runtime environment are submitted again, up to `retries` times.
    """

    def __init__(self, dashboard: str, logs: Path, *, ship_code: bool, retries: int = 2) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client, self.logs, self.ship_code, self.retries = JobSubmissionClient(dashboard), logs, ship_code, retries
        self.specs: dict[str, tuple[str, list[str]]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def submit(self, name: str, module: str, args: list[str]) -> str:
        self.specs[name] = (module, args)
        env_vars = {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        if self.ship_code:
            runtime_env = {"working_dir": str(REPO_ROOT), "excludes": [".git", ".venv", "runs", ".cache", "**/__pycache__"]}
            entrypoint = shlex.join([sys.executable, "-m", module, *args])
        else:
            env_vars["PYTHONPATH"] = str(REPO_ROOT)
            runtime_env = {}
            entrypoint = f"cd {shlex.quote(str(REPO_ROOT))} && " + shlex.join([sys.executable, "-m", module, *args])
        job_id = self.client.submit_job(entrypoint=entrypoint, runtime_env={**runtime_env, "env_vars": env_vars},
                                        submission_id=f"{name}-{time.time_ns()}")
        log(f"submitted {name} as Ray job {job_id}")
        return job_id

    def wait(self, jobs: dict[str, str], *, echo: tuple[str, ...] = ("[stage",)) -> None:
        """Wait for all jobs, echoing stage lines from their logs; raise if any did not succeed."""
        from ray.job_submission import JobStatus

        printed = {name: 0 for name in jobs}
        last_echo = {name: "" for name in jobs}
        retries = {name: self.retries for name in jobs}
        pending = dict(jobs)
        while pending:
            time.sleep(2)
            for name, job_id in list(pending.items()):
                status = self.client.get_job_status(job_id)  # before the logs, so a finished job's logs are complete
                text = self.client.get_job_logs(job_id)
                lines = text.splitlines()
                for line in lines[printed[name]:]:
                    # Worker lines arrive as "(RayTrainWorker pid=N) [stage1] ...", coloured.
                    line = _WORKER_PREFIX.sub("", _ANSI.sub("", line))
                    if (any(mark in line for mark in echo) or "Error" in line) and line != last_echo[name]:
                        print(f"  {name} | {line}", flush=True)
                        last_echo[name] = line
                printed[name] = len(lines)
                if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    continue
                (self.logs / f"{name}.log").write_text(text)
                del pending[name]
                if status == JobStatus.SUCCEEDED:
                    continue
                message = self.client.get_job_info(job_id).message or ""
                if "RuntimeEnvSetupError" in text + message and retries[name] > 0:
                    retries[name] -= 1
                    log(f"{name}: Ray could not set up the job's runtime environment; submitting it again")
                    pending[name] = self.submit(name, *self.specs[name])
                    printed[name], last_echo[name] = 0, ""
                    continue
                raise RuntimeError(f"Ray job {job_id} ({name}) ended {status}; its full log is {self.logs / (name + '.log')}")


def _stage_args(cfg: PipelineConfig, stage: str, extra: list[str]) -> list[str]:
    sets = [*extra, *cfg.overrides, *cfg.stage_overrides.get(stage, ())]
    return ["--stage", stage, "--config", cfg.config, *[arg for s in sets for arg in ("--set", s)]]


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.out).resolve()
    storage_path = out / "stages"
    started = time.perf_counter()
    head = None if cfg.address else LocalRayHead(cfg.num_cpus, out / "logs" / "ray-head.log").__enter__()
    try:
        dashboard = cfg.address or head.dashboard
        if head is not None:
            log(f"started a local Ray head: {head.gcs} (jobs at {head.dashboard})")
        runner = JobRunner(dashboard, out / "logs", ship_code=head is None)
        stage_seq = load_job_config(cfg.config, stage="stage1", overrides=[*PipelineConfig._fillers("stage1"), *cfg.overrides]).train.seq_len

        log(f"prep: {', '.join(cfg.sources)} -> {out / 'data'} (vocab {cfg.vocab_size}, seq_len {stage_seq})")
        tick = time.perf_counter()
        prep_args = [arg for source in cfg.sources for arg in ("--source", source)]
        prep_args += ["--out", str(out / "data"), "--vocab-size", str(cfg.vocab_size), "--seq-len", str(stage_seq), "--no-progress"]
        runner.wait({"prep": runner.submit("prep", "launchers.prep", prep_args)}, echo=("prep:",))
        manifest = str(out / "data" / "manifest.json")
        log(f"prep done in {time.perf_counter() - tick:.0f}s: {manifest}")
        common = [f"data.manifest={manifest}", f"run.storage_path={storage_path}"]

        def export_of(stage: str) -> str:
            point = checkpoints.find_resume_point(str(storage_path), stage)
            if point is None:
                raise RuntimeError(f"{stage} left no complete checkpoint under {storage_path}")
            return str(point.directory / checkpoints.EXPORT_DIR)

        def run(stages: dict[str, list[str]]) -> None:
            tick = time.perf_counter()
            jobs = {stage: runner.submit(stage, "launchers.train", _stage_args(cfg, stage, common + extra)) for stage, extra in stages.items()}
            runner.wait(jobs)
            for stage in stages:
                metrics = checkpoints.verify_complete(Path(export_of(stage)).parent)["metrics"]
                log(f"{stage} finished ({time.perf_counter() - tick:.0f}s): validation perplexity "
                    f"{metrics.get('val_perplexity', float('nan')):.2f} (loss {metrics.get('val_loss', float('nan')):.4f})")

        run({"stage1": []})
        base = export_of("stage1")
        stage2 = {s: [f"run.init_from={base}"] for s in ("stage2-text", "stage2-code")}
        job = load_job_config(cfg.config, stage="stage2-text", overrides=[*PipelineConfig._fillers("stage2-text"), *cfg.overrides])
        needed = 2 * job.scaling.num_workers * job.scaling.cpus_per_worker
        # On a cluster of our own we know its size; a given cluster is trusted to queue the second job's workers.
        available = cfg.num_cpus if head is not None else float("inf")
        if available >= needed:
            log("stage2-text and stage2-code run side by side")
            run(stage2)
        else:
            log(f"stage2-text and stage2-code run one after the other (the cluster has {available:g} CPUs, both need {needed:g})")
            for stage, extra in stage2.items():
                run({stage: extra})
        run({"stage3": [f"run.init_from_text={export_of('stage2-text')}", f"run.init_from_code={export_of('stage2-code')}"]})

        report = evaluate_exports(manifest, {s: export_of(s) for s in ("stage1", "stage2-text", "stage2-code", "stage3")}, cfg.eval_batches)
        sample = sample_text(export_of("stage3"), cfg.prompt, cfg.sample_tokens)
        log(f"sample from the fused model, prompt {cfg.prompt!r}:\n{cfg.prompt}{sample}\n")
        report["seconds"] = time.perf_counter() - started
        log(f"pipeline finished in {report['seconds']:.0f}s; outputs under {out}")
        failures = [f"{domain}: expert {r['expert']:.4f} >= base {r['base']:.4f}" for domain, r in report["stage2_vs_base"].items() if not r["expert"] < r["base"]]
        if failures:
            raise PipelineCheckFailed("stage 2 did not lower its own domain's validation loss below the base: " + "; ".join(failures))
        return report
    finally:
        if head is not None:
            head.__exit__()


def evaluate_exports(manifest: str, exports: dict[str, str], eval_batches: int) -> dict:
    """Validation loss/perplexity of every export; stage-2 experts against the base on their domain."""
    from mmrec.data import ShardLoader
    from mmrec.train import build_from_export, evaluate, read_export

    def val_batches(domains: tuple[str, ...]) -> list[dict]:
        loader = ShardLoader(manifest, domains, split="val", micro_batch_size=8, infinite=False, prefetch=False)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == eval_batches:
                break
        return batches

    models = {stage: build_from_export(read_export(path)) for stage, path in exports.items()}
    text, code, mixed = val_batches(("text",)), val_batches(("code",)), val_batches(("text", "code"))
    expert = lambda m: (lambda ids: m(ids)[0])  # noqa: E731
    rows, comparison = [], {}
    for domain, batches in (("text", text), ("code", code)):
        base = evaluate(models["stage1"], batches, expert(models["stage1"]))
        tuned = evaluate(models[f"stage2-{domain}"], batches, expert(models[f"stage2-{domain}"]))
        comparison[domain] = {"base": base.loss, "expert": tuned.loss}
        rows.append((f"stage1 base on {domain}", base))
        rows.append((f"stage2-{domain} on {domain}", tuned))
    fused = models["stage3"]
    rows.append(("stage1 base on mixed", evaluate(models["stage1"], mixed, expert(models["stage1"]))))
    rows.append(("stage3 fused on mixed", evaluate(fused, mixed, lambda ids: fused(ids, expert=None)[0])))
    log("validation (same batches for every model):")
    print(f"  {'model / data':28s} {'loss':>8s} {'ppl':>9s} {'acc':>6s}")
    for name, result in rows:
        print(f"  {name:28s} {result.loss:8.4f} {result.perplexity:9.2f} {result.accuracy:6.3f}")
    for domain, r in comparison.items():
        verdict = "lower, as required" if r["expert"] < r["base"] else "NOT lower"
        log(f"stage 2 vs base on {domain}: {r['expert']:.4f} vs {r['base']:.4f} ({verdict})")
    return {"validation": {name: result.loss for name, result in rows}, "stage2_vs_base": comparison}


def sample_text(export: str, prompt: str, tokens: int) -> str:
    from mmrec.train import build_from_export, generate, load_tokenizer, read_export, step_fn_for

    model = build_from_export(read_export(export))
    tokenizer = load_tokenizer(export)
    ids = generate(step_fn_for(model, None), tokenizer.encode(prompt), tokens, temperature=0.8, top_k=40, seed=0)
    return tokenizer.decode(ids)
