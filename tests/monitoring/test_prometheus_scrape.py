"""A real Prometheus scrapes a short real training run; dashboards and alerts query it.

One module-scoped run (tiny stage-1 model, real Trainer and AdamW, 1 s scrapes) feeds every test
here, so the expensive part happens once.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import yaml

from mmrec.metrics import ExporterOptions, MetricsExporter, names
from mmrec.metrics.dashboard import promql_expressions

from .conftest import K8S, RULES, start_prometheus, stop_prometheus

pytestmark = pytest.mark.slow

STEPS, BATCH, SEQ_LEN = 16, 2, 32
LABELS = 'stage="stage1", expert="base", rank="0"'


def records(result, kind):
    from mmrec.train.records import read_records

    return [r for r in read_records(result.run_url) if r["kind"] == kind]


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory, plain_rules_file):
    from core.config import resolve
    from mmrec.train import Trainer
    from tests.support.synthetic_data import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("scrape")
    manifest = write_synthetic_dataset(tmp / "data", seq_len=SEQ_LEN, train_samples=64, val_samples=8)
    cfg = resolve({
        "model": {"name": "tiny"},
        "train": dict(max_steps=STEPS, warmup_steps=2, micro_batch_size=BATCH, seq_len=SEQ_LEN, eval_every=8,
                      eval_batches=2, checkpoint_every=8, log_every=1, precision="fp32"),
        "data": {"manifest": manifest}, "run": {"storage_path": str(tmp / "runs")},
    }, stage="stage1")
    exporter = MetricsExporter(
        stage="stage1", expert="base", rank=0, config=ExporterOptions(port=0, host="127.0.0.1"),
        run_info={"config": "tiny", "seq_len": str(SEQ_LEN)},
    )
    server = start_prometheus(tmp, targets=[f"127.0.0.1:{exporter.port}"], rule_files=[plain_rules_file])
    try:
        # One scrape before the first step, so rate() sees the counters rise even when the whole run
        # fits between two scrapes on a fast machine.
        deadline = time.monotonic() + 30
        while not server.query(f"{names.TOKENS}_total{{{LABELS}}}") and time.monotonic() < deadline:
            time.sleep(0.2)
        result = Trainer(cfg, metrics=exporter).fit()
        result.manifest = manifest
        # Wait for a scrape after the last step, and for one more rule evaluation after that.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = server.query(f"{names.TRAIN_STEP}{{{LABELS}}}")
            if seen and float(seen[0]["value"][1]) == STEPS:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus never saw step {STEPS}:\n{server.log()}")
        time.sleep(2)
        yield server, result
    finally:
        exporter.close()
        stop_prometheus(server)


def value(sample: dict) -> float:
    return float(sample["value"][1])


def test_loss_and_tokens_per_second_series_have_sensible_values(scraped_run):
    server, result = scraped_run
    (loss,) = server.query(f"{names.TRAIN_LOSS}{{{LABELS}}}")
    assert loss["metric"]["job"] == "mmrec"
    # The last step's loss, as the trainer computed it, and near ln(V) for a model this young.
    assert value(loss) == pytest.approx(records(result, "train")[-1]["loss"], rel=1e-9)
    from core.manifest import load_manifest

    vocab = load_manifest(result.manifest).vocab_size
    assert 0.5 * math.log(vocab) < value(loss) < 1.5 * math.log(vocab)
    # Several scrapes landed during training, not just one at the end.
    (scrapes,) = server.query(f"count_over_time({names.TRAIN_LOSS}{{{LABELS}}}[10m])")
    assert value(scrapes) >= 3

    (tokens,) = server.query(f"{names.TOKENS}_total{{{LABELS}}}")
    assert value(tokens) == STEPS * BATCH * SEQ_LEN
    (rate,) = server.query(f"rate({names.TOKENS}_total{{{LABELS}}}[10m])")
    (per_step,) = server.query(f"{names.TOKENS_PER_SECOND}{{{LABELS}}}")
    (step_sum,) = server.query(f"{names.STEP_DURATION}_sum{{{LABELS}}}")
    # Tokens/s as the worker measured it: between "a step took the whole run" and 10 M tok/s.
    assert STEPS * BATCH * SEQ_LEN / value(step_sum) / STEPS < value(per_step) < 1e7
    assert 0 < value(rate) < 1e7
    (mfu,) = server.query(f"{names.MFU}{{{LABELS}}}")
    assert 0 < value(mfu) < 1  # against the peak the run measured (no peak was configured)


def test_step_time_breakdown_adds_up_to_the_step_time(scraped_run):
    server, _ = scraped_run
    phases = {s["metric"]["phase"]: value(s) for s in server.query(f"{names.STEP_PHASE}_total{{{LABELS}}}")}
    assert set(phases) == set(names.STEP_PHASES)
    (total,) = server.query(f"{names.STEP_DURATION}_sum{{{LABELS}}}")
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["forward_backward"] > 0 and phases["optimizer"] > 0
    # The phases are measured inside the step, so they cannot exceed it.
    assert sum(phases.values()) <= value(total) + 1e-6


def test_eval_checkpoint_and_norm_series_arrive(scraped_run):
    server, result = scraped_run
    (val_loss,) = server.query(f"{names.VALIDATION_LOSS}{{{LABELS}}}")
    assert value(val_loss) == pytest.approx(records(result, "eval")[-1]["val_loss"], rel=1e-9)
    (saved_step,) = server.query(f"{names.CHECKPOINT_LAST_STEP}{{{LABELS}}}")
    assert value(saved_step) == STEPS
    h_norms = server.query(f"{names.STATE_H_NORM}{{{LABELS}}}")
    from mmrec import get_config

    assert sorted(s["metric"]["layer"] for s in h_norms) == [str(i) for i in range(get_config("tiny").n_layers)]
    assert all(value(s) > 0 for s in h_norms)
    (rss,) = server.query(f"{names.RESIDENT_MEMORY}{{{LABELS}}}")
    assert value(rss) > 50e6  # a process with torch loaded
    (info,) = server.query(f"{names.RUN}_info")
    assert info["metric"]["config"] == "tiny" and info["metric"]["stage"] == "stage1"


def substitute_grafana_variables(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$stage", ".*").replace("$expert", ".*")


# Series a CPU run without Ray cannot produce; their queries must still parse and run.
NOT_PRODUCED_HERE = re.compile(r"ray_node_|gpu_memory")


def test_every_dashboard_expression_evaluates_and_training_panels_have_data(scraped_run):
    server, _ = scraped_run
    dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    exprs = promql_expressions(dashboard)
    assert len(exprs) >= 20
    empty = []
    for expr in exprs:
        if expr.startswith("label_values("):  # Grafana's variable syntax, not PromQL
            metric = re.match(r"label_values\((\w+)", expr).group(1)
            assert server.api("label/stage/values", **{"match[]": metric}) == ["stage1"]
            continue
        result = server.query(substitute_grafana_variables(expr))
        if not result and not NOT_PRODUCED_HERE.search(expr):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data from a real training run: {empty}"


def test_every_alert_expression_evaluates_and_rules_are_healthy(scraped_run):
    server, _ = scraped_run
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    for expr in exprs:
        server.query(expr)  # raises with Prometheus' message when the expression is invalid
    loaded = [rule for group in server.api("rules")["groups"] for rule in group["rules"]]
    assert len(loaded) == len(exprs)
    assert {rule["health"] for rule in loaded} == {"ok"}, [(r["name"], r.get("lastError")) for r in loaded]
    # A healthy run fires nothing (a NaN or a stall would).
    firing = [a for a in server.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []
