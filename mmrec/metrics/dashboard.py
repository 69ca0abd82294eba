"""Grafana dashboard for MM-Rec training, generated with grafana-foundation-sdk.

The committed k8s/monitoring/dashboard.json is this module's output; edit the panels here and
regenerate (a test fails when the two differ):

    python -m mmrec.metrics.dashboard k8s/monitoring/dashboard.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

from mmrec.metrics import names as n

DASHBOARD_UID = "mmrec-training"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every training panel narrows to the stage/expert picked at the top of the dashboard.
SEL = 'stage=~"$stage", expert=~"$expert"'
RATE = "$__rate_interval"
BY = "stage, expert"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    stacked: bool = False


def _q(expr: str, legend: str) -> Query:
    return Query(" ".join(expr.split()), legend)


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Throughput",
        (
            PanelSpec("Tokens / s", "short", (_q(f"sum by ({BY}) (rate({n.TOKENS}_total{{{SEL}}}[{RATE}]))", "{{stage}}/{{expert}}"),),
                      "All workers of a stage summed; from the tokens counter."),
            PanelSpec(
                "Samples / s",
                "short",
                (
                    _q(f"sum by ({BY}) (rate({n.SAMPLES}_total{{{SEL}}}[{RATE}]))", "{{stage}}/{{expert}}"),
                    _q(f"{n.SAMPLES_PER_SECOND}{{{SEL}}}", "{{stage}}/{{expert}} rank {{rank}} last step"),
                ),
            ),
            PanelSpec("MFU", "percentunit", (_q(f"avg by ({BY}) ({n.MFU}{{{SEL}}})", "{{stage}}/{{expert}}"),),
                      "Model FLOPs utilisation against the configured peak FLOP/s; empty when no peak is configured."),
            PanelSpec("Tokens / s per rank", "short", (_q(f"{n.TOKENS_PER_SECOND}{{{SEL}}}", "{{stage}}/{{expert}} rank {{rank}}"),),
                      "Each worker's last step: a slow rank stands out here."),
        ),
    ),
    (
        "Loss and quality",
        (
            PanelSpec("Training loss", "none", (_q(f"avg by ({BY}) ({n.TRAIN_LOSS}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
            PanelSpec("Validation loss", "none", (_q(f"avg by ({BY}) ({n.VALIDATION_LOSS}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
            PanelSpec("Validation perplexity", "none", (_q(f"avg by ({BY}) ({n.VALIDATION_PERPLEXITY}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
            PanelSpec("Validation token accuracy", "percentunit", (_q(f"avg by ({BY}) ({n.VALIDATION_ACCURACY}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
            PanelSpec("Learning rate", "none", (_q(f"max by ({BY}) ({n.LEARNING_RATE}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
            PanelSpec("Gradient norm (before clipping)", "none", (_q(f"max by ({BY}) ({n.GRAD_NORM}{{{SEL}}})", "{{stage}}/{{expert}}"),)),
        ),
    ),
    (
        "Step time",
        (
            PanelSpec(
                "Step time breakdown (mean per step)",
                "s",
                (
                    _q(
                        f"sum by ({BY}, phase) (rate({n.STEP_PHASE}_total{{{SEL}}}[{RATE}])) "
                        f"/ on ({BY}) group_left sum by ({BY}) (rate({n.STEP_DURATION}_count{{{SEL}}}[{RATE}]))",
                        "{{stage}}/{{expert}} {{phase}}",
                    ),
                ),
                "Data wait, forward+backward and optimizer seconds per step, averaged over all workers.",
                stacked=True,
            ),
            PanelSpec(
                "Step time quantiles",
                "s",
                (
                    _q(f"histogram_quantile(0.5, sum by ({BY}, le) (rate({n.STEP_DURATION}_bucket{{{SEL}}}[{RATE}])))", "p50 {{stage}}/{{expert}}"),
                    _q(f"histogram_quantile(0.95, sum by ({BY}, le) (rate({n.STEP_DURATION}_bucket{{{SEL}}}[{RATE}])))", "p95 {{stage}}/{{expert}}"),
                ),
            ),
            PanelSpec(
                "Data-wait share of step time",
                "percentunit",
                (
                    _q(
                        f'sum by ({BY}) (rate({n.STEP_PHASE}_total{{{SEL}, phase="data_wait"}}[{RATE}])) '
                        f"/ sum by ({BY}) (rate({n.STEP_DURATION}_sum{{{SEL}}}[{RATE}]))",
                        "{{stage}}/{{expert}}",
                    ),
                ),
                "The MMRecDataWaitHigh alert fires above 25 %.",
            ),
        ),
    ),
    (
        "Memory and state norms",
        (
            PanelSpec("Process RSS", "bytes", (_q(f"{n.RESIDENT_MEMORY}{{{SEL}}}", "{{stage}}/{{expert}} rank {{rank}}"),)),
            PanelSpec(
                "GPU memory",
                "bytes",
                (
                    _q(f"{n.GPU_ALLOCATED}{{{SEL}}}", "allocated rank {{rank}} gpu {{device}}"),
                    _q(f"{n.GPU_RESERVED}{{{SEL}}}", "reserved rank {{rank}} gpu {{device}}"),
                ),
            ),
            PanelSpec("Recurrent state h norm per layer", "none", (_q(f"avg by ({BY}, layer) ({n.STATE_H_NORM}{{{SEL}}})", "{{expert}} layer {{layer}}"),)),
            PanelSpec("Memory M norm per layer", "none", (_q(f"avg by ({BY}, layer) ({n.STATE_MEMORY_NORM}{{{SEL}}})", "{{expert}} layer {{layer}}"),)),
        ),
    ),
    (
        "Reliability",
        (
            PanelSpec(
                "Restarts, NaN rollbacks, corrupt shards (per hour)",
                "short",
                (
                    _q(f"sum by ({BY}) (increase({n.RESTARTS}_total{{{SEL}}}[1h]))", "restarts {{stage}}/{{expert}}"),
                    _q(f"sum by ({BY}) (increase({n.NAN_ROLLBACKS}_total{{{SEL}}}[1h]))", "NaN rollbacks {{stage}}/{{expert}}"),
                    _q(f"sum by ({BY}) (increase({n.CORRUPT_SHARDS}_total{{{SEL}}}[1h]))", "corrupt shards {{stage}}/{{expert}}"),
                ),
            ),
            PanelSpec("Checkpoint duration", "s", (_q(f"max by ({BY}, kind) ({n.CHECKPOINT_LAST_DURATION}{{{SEL}}})", "{{kind}} {{stage}}/{{expert}}"),)),
            PanelSpec(
                "Checkpoint age",
                "s",
                (_q(f"time() - max by ({BY}) ({n.CHECKPOINT_LAST_SAVE_TIMESTAMP}{{{SEL}}})", "{{stage}}/{{expert}}"),),
                "The MMRecCheckpointTooOld alert fires above one hour.",
            ),
            PanelSpec(
                "Seconds since the last step",
                "s",
                (_q(f"time() - max by ({BY}) ({n.LAST_STEP_TIMESTAMP}{{{SEL}}})", "{{stage}}/{{expert}}"),),
                "The MMRecNoProgress alert fires above 10 minutes.",
            ),
            PanelSpec(
                "Training step and last checkpoint step",
                "short",
                (
                    _q(f"max by ({BY}) ({n.TRAIN_STEP}{{{SEL}}})", "step {{stage}}/{{expert}}"),
                    _q(f"max by ({BY}) ({n.CHECKPOINT_LAST_STEP}{{{SEL}}})", "checkpoint {{stage}}/{{expert}}"),
                ),
            ),
        ),
    ),
    (
        "Ray cluster",
        (
            PanelSpec("Node CPU utilisation", "percent", (_q("ray_node_cpu_utilization", "{{instance}}"),)),
            PanelSpec("Node memory used", "bytes", (_q("ray_node_mem_used", "{{instance}}"),)),
            PanelSpec("Node GPU utilisation", "percent", (_q("ray_node_gpus_utilization", "{{instance}} gpu {{GpuIndex}}"),)),
            PanelSpec("Node GPU memory used", "mbytes", (_q("ray_node_gram_used", "{{instance}} gpu {{GpuIndex}}"),)),
        ),
    ),
)


def _panel(spec: PanelSpec) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(spec.title)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12 if len(spec.queries) > 1 or spec.stacked else 8)
    )
    if spec.description:
        panel = panel.description(spec.description)
    if spec.stacked:
        panel = panel.stacking(gcommon.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    for ref, query in zip("ABCDEFGH", spec.queries):
        panel = panel.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref))
    return panel


def build_dashboard() -> dict:
    """The dashboard as a JSON-ready dict."""
    board = (
        gd.Dashboard("MM-Rec training")
        .uid(DASHBOARD_UID)
        .description("Throughput, loss, step time, memory, reliability of MM-Rec training runs, and the Ray cluster.")
        .tags(["mmrec", "training", "ray"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            gd.QueryVariable("stage")
            .label("Stage")
            .datasource(DATASOURCE)
            .query(f"label_values({n.TRAIN_STEP}, stage)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            gd.QueryVariable("expert")
            .label("Expert")
            .datasource(DATASOURCE)
            .query(f'label_values({n.TRAIN_STEP}{{stage=~"$stage"}}, expert)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    for title, panels in ROWS:
        board = board.with_row(gd.Row(title))
        for spec in panels:
            board = board.with_panel(_panel(spec))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def promql_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression in a dashboard JSON (panel targets and query variables)."""
    exprs = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            exprs.append(variable["query"])
    return exprs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the MM-Rec Grafana dashboard JSON.")
    parser.add_argument("out", type=Path, help="output file, e.g. k8s/monitoring/dashboard.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, prefix=f".{args.out.name}.", delete=False) as tmp:
        tmp.write(render())
    os.replace(tmp.name, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
