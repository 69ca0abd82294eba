"""The whole run as Ray jobs: prep -> stage1 -> stage2-text + stage2-code -> stage3 -> evaluation -> sample.

    python -m launchers.pipeline --config configs/smoke.toml        # `make smoke`

Every job is the same command a user would give `ray job submit` (`python -m launchers.prep ...`,
`python -m launchers.train --stage ...`) with the same --config file and --set values, so the
pipeline adds nothing a single stage job does not have. Stages chain through run:<name> exports.
At the end every model is scored on every domain (base, text expert, code expert, fused x text,
code, mixed) and the run fails with a clear message unless each expert beats the base on its own
domain and the fused model is no worse than each expert on its domain and than the experts routed
by an oracle on mixed data (within pipeline.fusion_slack). Everything lands under pipeline.out:
data/, stages/<stage>/ (checkpoints, exports, metrics.jsonl, loss.png), logs/, report.json,
evaluation.json and report.png.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.job_runner import REPO_ROOT, JobRunner
from cluster.ray_head import LocalRayHead
from core import storage
from core.config import Config, ConfigError, resolve
from core.stages import STAGE_NAMES, STAGES

log = logging.getLogger("cluster.pipeline")


class PipelineCheckFailed(RuntimeError):
    """The stages ran but the models do not do what the pipeline requires (the message says which check)."""


def _info(line: str) -> None:
    log.info("[pipeline] %s", line)


def _fillers(stage: str, manifest: str, stages_url: str) -> list[str]:
    sets = [f"data.manifest={manifest}", f"run.storage_path={stages_url}", "ray.address="]
    if STAGES[stage].expert is not None:
        sets.append("run.init_from=run:stage1")
    if STAGES[stage].trains == "fusion":
        sets += ["run.init_from_text=run:stage2-text", "run.init_from_code=run:stage2-code"]
    return sets


def stage_configs(values: Mapping[str, Any], overrides: Sequence[str], out: str) -> dict[str, Config]:
    """Every stage's resolved config, checked before any job starts (the inputs later jobs make are filled in)."""
    stages_url = storage.join(out, "stages")
    configs = {stage: resolve(values, stage=stage,
                              overrides=[*overrides, *_fillers(stage, storage.join(out, "data", "manifest.json"), stages_url)])
               for stage in STAGE_NAMES}
    for stage, cfg in configs.items():
        if cfg.engine.kind != "deepspeed":
            raise ConfigError(f"the pipeline runs every stage as a Ray Train job: set engine.kind='deepspeed' "
                              f"(the {stage} config has {cfg.engine.kind!r})")
    return configs


def run_pipeline(values: Mapping[str, Any], *, config_path: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """Run everything; returns the report (also written to <out>/report.json)."""
    cfg = resolve(values, overrides=overrides)
    out = storage.absolute(cfg.pipeline.out)
    configs = stage_configs(values, overrides, out)
    data_url, stages_url, logs_url = (storage.join(out, part) for part in ("data", "stages", "logs"))
    manifest = storage.join(data_url, "manifest.json")
    storage.check_writable_location(out)
    head = None
    if not cfg.pipeline.address:
        for stage, stage_cfg in configs.items():
            need = stage_cfg.scaling.num_workers * stage_cfg.scaling.cpus_per_worker
            if need > cfg.pipeline.num_cpus:
                raise ConfigError(f"{stage} needs {need:g} CPUs ({stage_cfg.scaling.num_workers} workers x "
                                  f"{stage_cfg.scaling.cpus_per_worker:g}) but the local head gets "
                                  f"pipeline.num_cpus={cfg.pipeline.num_cpus}: raise it or lower scaling.num_workers")
    started = time.perf_counter()
    report: dict[str, Any] = {"out": out, "stages": {}, "config": cfg.to_dict(), "versions": _versions()}
    runner = None
    try:
        if not cfg.pipeline.address:
            head = LocalRayHead(cfg.pipeline.num_cpus, Path(tempfile.mkdtemp(prefix="mmrec-pipeline-")) / "ray-head.log")
            head.__enter__()
            _info(f"started a local Ray head: {head.gcs} (jobs at {head.dashboard}; pid {head.pid})")
        runner = JobRunner(cfg.pipeline.address or head.dashboard, logs_url, ship_code=head is None,
                           schedule_timeout_s=cfg.ray.schedule_timeout_s)
        common = (["--config", config_path] if config_path else []) + [a for o in overrides for a in ("--set", o)]

        seq_len = configs["stage1"].train.seq_len
        _info(f"prep: {', '.join(cfg.prep.sources)} -> {data_url} (vocab {cfg.prep.vocab_size}, seq_len {seq_len})")
        tick = time.perf_counter()
        runner.submit("prep", "launchers.prep", [*common, "--set", f"prep.out={data_url}", "--set",
                                                 f"prep.seq_len={seq_len}", "--set", "prep.progress=false",
                                                 "--set", "ray.address="])
        runner.wait(["prep"], echo=("prep:", "[prep"))
        report["prep_seconds"] = time.perf_counter() - tick
        _info(f"prep done in {report['prep_seconds']:.0f}s: {manifest}")

        def run(stages: list[str]) -> None:
            tick = time.perf_counter()
            for stage in stages:
                runner.submit(stage, "launchers.train",
                              ["--stage", stage, *common, *[a for f in _fillers(stage, manifest, stages_url)
                                                             for a in ("--set", f)]])
            runner.wait(stages)
            for stage in stages:
                report["stages"][stage] = _stage_summary(stages_url, stage, time.perf_counter() - tick)
                best = report["stages"][stage].get("best_val_loss")
                _info(f"{stage} finished in {report['stages'][stage]['seconds']:.0f}s"
                      + (f": best validation loss {best:.4f}" if best is not None else ""))

        run(["stage1"])
        second = ["stage2-text", "stage2-code"]
        need = sum(configs[s].scaling.num_workers * configs[s].scaling.cpus_per_worker for s in second)
        if head is None or cfg.pipeline.num_cpus >= need:
            _info("stage2-text and stage2-code run side by side")
            run(second)
        else:
            _info(f"stage2-text and stage2-code run one after the other (the head has {cfg.pipeline.num_cpus} CPUs, "
                  f"both need {need:g})")
            for stage in second:
                run([stage])
        run(["stage3"])

        from mmrec.train.checkpoint import resolve_export

        exports = {stage: resolve_export(f"run:{stage}", stages_url) for stage in STAGE_NAMES}
        evaluation = evaluate_pipeline(manifest, exports, cfg.pipeline.eval_batches)
        report["evaluation"] = evaluation
        storage.write_text(storage.join(out, "evaluation.json"), json.dumps(evaluation, indent=1) + "\n")
        report["verdicts"] = verdicts(evaluation, cfg.pipeline.fusion_slack)
        report["sample"] = {"prompt": cfg.pipeline.prompt,
                            "text": sample_text(exports["stage3"], cfg.pipeline.prompt, cfg.pipeline.sample_tokens)}
        _info(f"sample from the fused model, prompt {cfg.pipeline.prompt!r}:\n{cfg.pipeline.prompt}{report['sample']['text']}\n")
        report["seconds"] = time.perf_counter() - started
        write_report(out, report)
        _info(f"pipeline finished in {report['seconds']:.0f}s; outputs under {out} (report.json, report.png)")
        failed = [v["check"] for v in report["verdicts"] if not v["passed"]]
        if failed and cfg.pipeline.enforce_checks:
            raise PipelineCheckFailed("; ".join(failed))
        return report
    except BaseException:
        if runner is not None and runner.running:
            runner.stop_all()
        raise
    finally:
        if head is not None:
            head.__exit__()


def _stage_summary(stages_url: str, stage: str, seconds: float) -> dict[str, Any]:
    from mmrec.train.records import read_records

    records = read_records(storage.join(stages_url, stage))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    summary: dict[str, Any] = {"seconds": seconds, "run": storage.join(stages_url, stage)}
    if train:
        summary.update(steps=train[-1]["step"], tokens=train[-1]["tokens"], final_train_loss=train[-1]["loss"],
                       tokens_per_s=sum(r["tokens_per_s"] for r in train) / len(train),
                       mfu=sum(r["mfu"] for r in train) / len(train))
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        summary.update(best_val_loss=best["val_loss"], best_val_perplexity=best["val_perplexity"], best_step=best["step"])
    return summary


def evaluate_pipeline(manifest: str, exports: dict[str, str], eval_batches: int) -> dict[str, Any]:
    """Every model on every domain on the same validation batches, plus the oracle-routed experts on mixed."""
    from mmrec.evaluation import oracle_routed, path_forward, score_rows, validation_batches
    from mmrec.train.export import build_from_export, read_export

    data = {"text": validation_batches(manifest, ("text",), max_batches=eval_batches),
            "code": validation_batches(manifest, ("code",), max_batches=eval_batches),
            "mixed": validation_batches(manifest, ("text", "code"), max_batches=eval_batches)}
    models = {"base": (build_from_export(read_export(exports["stage1"])), "expert"),
              "text expert": (build_from_export(read_export(exports["stage2-text"])), "expert"),
              "code expert": (build_from_export(read_export(exports["stage2-code"])), "expert")}
    fused_model = build_from_export(read_export(exports["stage3"]))
    models["fused"] = (fused_model, "fused")
    table: dict[str, dict[str, dict[str, float]]] = {}
    rows: dict[tuple[str, str], Any] = {}
    for name, (model, path) in models.items():
        table[name] = {}
        for domain, batches in data.items():
            rows[name, domain] = score_rows(path_forward(model, path), batches)
            result = rows[name, domain].result()
            table[name][domain] = {"loss": result.loss, "perplexity": result.perplexity, "accuracy": result.accuracy,
                                   "tokens": result.tokens}
    oracle = oracle_routed({"text": rows["text expert", "mixed"], "code": rows["code expert", "mixed"]})
    table["oracle-routed experts"] = {"mixed": {"loss": oracle.loss, "perplexity": oracle.perplexity,
                                                "accuracy": oracle.accuracy, "tokens": oracle.tokens}}
    _info("validation loss (nats/token; same batches for every model):")
    log.info("  %-24s %8s %8s %8s", "model", "text", "code", "mixed")
    for name, scores in table.items():
        cells = [f"{scores[d]['loss']:8.4f}" if d in scores else f"{'':8s}" for d in ("text", "code", "mixed")]
        log.info("  %-24s %s", name, " ".join(cells))
    return table


def verdicts(table: dict[str, Any], slack: float) -> list[dict[str, Any]]:
    """The pipeline's checks on the evaluation table, each with its figures and whether it passed."""
    loss = {name: {d: v["loss"] for d, v in scores.items()} for name, scores in table.items()}
    checks = []

    def check(passed: bool, text: str) -> None:
        checks.append({"check": text, "passed": bool(passed)})
        _info(f"{'PASS' if passed else 'FAIL'}: {text}")

    for domain in ("text", "code"):
        expert, base = loss[f"{domain} expert"][domain], loss["base"][domain]
        check(expert < base, f"the {domain} expert beats the base on {domain}: {expert:.4f} < {base:.4f}")
        fused = loss["fused"][domain]
        check(fused <= expert + slack,
              f"the fused model is no worse than the {domain} expert on {domain}: {fused:.4f} <= {expert:.4f} + {slack}")
    fused, oracle = loss["fused"]["mixed"], loss["oracle-routed experts"]["mixed"]
    best_single = min(loss["text expert"]["mixed"], loss["code expert"]["mixed"])
    check(fused < best_single, f"the fused model beats both experts on mixed data: {fused:.4f} < {best_single:.4f}")
    check(fused <= oracle + slack,
          f"the fused model matches the oracle-routed experts on mixed data: {fused:.4f} <= {oracle:.4f} + {slack}")
    return checks


def sample_text(export: str, prompt: str, tokens: int) -> str:
    from mmrec.train.export import open_export
    from mmrec.train.generate import generate, step_fn_for

    loaded = open_export(export, storage_path="", device="cpu")
    ids = generate(step_fn_for(loaded.model, None), loaded.tokenizer.encode(prompt), tokens, temperature=0.8, top_k=40,
                   seed=0, stop_id=loaded.tokenizer.eos_id)
    return loaded.tokenizer.decode(ids)


def _versions() -> dict[str, str]:
    import deepspeed
    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "deepspeed": deepspeed.__version__, "git_commit": commit or "unknown", "machine": platform.machine()}


def write_report(out: str, report: dict[str, Any]) -> None:
    """report.json and report.png (every stage's loss curves on one sheet) into the pipeline's directory."""
    from mmrec.train.records import plot_losses, read_records

    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=1, default=str) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    for ax, stage in zip(axes.flat, STAGE_NAMES):
        if not plot_losses(read_records(storage.join(out, "stages", stage)), Path(), stage, ax=ax):
            ax.set_title(f"{stage}: no records")
    figure.suptitle("MM-Rec pipeline: training and validation loss per stage")
    figure.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        figure.savefig(Path(tmp) / "report.png")
        plt.close(figure)
        storage.write_bytes(storage.join(out, "report.png"), (Path(tmp) / "report.png").read_bytes())
