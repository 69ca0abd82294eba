"""MetricsExporter: hook semantics, exposition format, port handling, input validation."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmrec.metrics import ExporterOptions, MetricsExporter, PortRangeExhaustedError, names

OFFLINE = ExporterOptions(serve=False)


def samples(exporter: MetricsExporter) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels without the worker labels): value} of the current exposition."""
    out = {}
    for family in text_string_to_metric_families(exporter.exposition().decode()):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in names.WORKER_LABELS}
            out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def one(values: dict, name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def step(exporter: MetricsExporter, **overrides) -> None:
    args = dict(
        step=1, loss=2.5, lr=3e-4, grad_norm=0.75, tokens=4096, samples=8, step_seconds=2.0,
        data_wait_seconds=0.5, forward_backward_seconds=1.25, optimizer_seconds=0.25,
    )
    exporter.on_step(**{**args, **overrides})


def test_every_hook_lands_in_its_series():
    exporter = MetricsExporter(stage="stage2-code", expert="code", rank=3, config=ExporterOptions(serve=False, peak_flops_per_second=1e9))
    step(exporter, flops_per_token=1e5)
    step(exporter, step=2, loss=2.25, tokens=1000, samples=2, step_seconds=0.5, data_wait_seconds=0.1)
    exporter.on_eval(step=2, loss=2.0, perplexity=math.exp(2.0), accuracy=0.4)
    exporter.on_checkpoint(kind="save", seconds=3.0, step=2)
    exporter.on_checkpoint(kind="load", seconds=1.5, step=2)
    exporter.on_state_norms(h_norms=[1.0, 2.0], memory_norms=[3.0, 4.0])
    exporter.on_restart()
    exporter.on_nan_rollback()
    exporter.on_nan_rollback()
    exporter.on_corrupt_shard()
    v = samples(exporter)

    assert one(v, names.TRAIN_LOSS) == 2.25 and one(v, names.TRAIN_STEP) == 2
    assert one(v, names.LEARNING_RATE) == 3e-4 and one(v, names.GRAD_NORM) == 0.75
    assert one(v, f"{names.TOKENS}_total") == 5096 and one(v, f"{names.SAMPLES}_total") == 10
    assert one(v, names.TOKENS_PER_SECOND) == 2000.0 and one(v, names.SAMPLES_PER_SECOND) == 4.0
    # MFU was set by the first step only (the second gave no flops_per_token): 1e5 * 2048 / 1e9.
    assert one(v, names.MFU) == pytest.approx(0.2048)
    assert one(v, f"{names.STEP_DURATION}_sum") == 2.5 and one(v, f"{names.STEP_DURATION}_count") == 2
    assert one(v, f"{names.STEP_PHASE}_total", phase="data_wait") == pytest.approx(0.6)
    assert one(v, f"{names.STEP_PHASE}_total", phase="forward_backward") == 2.5
    assert one(v, f"{names.STEP_PHASE}_total", phase="optimizer") == 0.5
    assert one(v, names.VALIDATION_LOSS) == 2.0 and one(v, names.VALIDATION_ACCURACY) == 0.4
    assert one(v, names.VALIDATION_PERPLEXITY) == pytest.approx(math.exp(2.0))
    assert one(v, names.CHECKPOINT_LAST_DURATION, kind="save") == 3.0
    assert one(v, names.CHECKPOINT_LAST_DURATION, kind="load") == 1.5
    assert one(v, f"{names.CHECKPOINT_DURATION}_count", kind="save") == 1
    assert one(v, names.CHECKPOINT_LAST_STEP) == 2
    assert one(v, names.STATE_H_NORM, layer="1") == 2.0 and one(v, names.STATE_MEMORY_NORM, layer="0") == 3.0
    assert one(v, f"{names.RESTARTS}_total") == 1 and one(v, f"{names.NAN_ROLLBACKS}_total") == 2
    assert one(v, f"{names.CORRUPT_SHARDS}_total") == 1
    assert one(v, names.RESIDENT_MEMORY) > 10e6
    # Every series carries the worker labels given to the constructor.
    family = next(f for f in text_string_to_metric_families(exporter.exposition().decode()) if f.name == names.TRAIN_LOSS)
    assert family.samples[0].labels == {"stage": "stage2-code", "expert": "code", "rank": "3"}


def test_gauges_without_a_value_are_absent_but_counters_start_at_zero():
    v = samples(MetricsExporter(stage="stage1", expert="base", config=OFFLINE))
    present = {name for name, _ in v}
    # Exported as 0 these would read as "checkpoint saved in 1970" or "validation loss 0".
    for name in (names.TRAIN_LOSS, names.VALIDATION_LOSS, names.CHECKPOINT_LAST_SAVE_TIMESTAMP, names.MFU):
        assert name not in present
    # Counters exist at 0 so that increase() sees the first event.
    assert one(v, f"{names.RESTARTS}_total") == 0 and one(v, f"{names.NAN_ROLLBACKS}_total") == 0
    assert one(v, names.START_TIME) > 1.6e9


def test_non_finite_loss_is_exported_as_is():
    exporter = MetricsExporter(stage="stage1", expert="base", config=OFFLINE)
    step(exporter, loss=float("nan"), grad_norm=float("inf"))
    v = samples(exporter)
    assert math.isnan(one(v, names.TRAIN_LOSS)) and one(v, names.GRAD_NORM) == math.inf


def test_exposition_passes_promtool_check_metrics(promtool):
    exporter = MetricsExporter(stage="stage1", expert="base", config=ExporterOptions(serve=False, peak_flops_per_second=1e12), run_info={"config": "tiny"})
    step(exporter, flops_per_token=1e6)
    exporter.on_eval(step=1, loss=2.0, perplexity=7.4, accuracy=0.3)
    exporter.on_checkpoint(kind="save", seconds=1.0, step=1)
    exporter.on_state_norms(h_norms=[1.0], memory_norms=[1.0])
    text = exporter.exposition()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert b"mmrec_run_info{" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tokens=-1), "tokens must be"),
        (dict(step_seconds=0.0), "step_seconds must be > 0"),
        (dict(data_wait_seconds=float("nan")), "data_wait_seconds must be"),
    ],
)
def test_bad_step_values_are_rejected_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        step(MetricsExporter(stage="stage1", expert="base", config=OFFLINE), **overrides)


def test_bad_hook_arguments_and_config_are_rejected():
    exporter = MetricsExporter(stage="stage1", expert="base", config=OFFLINE)
    with pytest.raises(ValueError, match="checkpoint kind must be one of"):
        exporter.on_checkpoint(kind="restore", seconds=1.0, step=1)
    with pytest.raises(ValueError, match="accuracy must be a ratio"):
        exporter.on_eval(step=1, loss=1.0, perplexity=2.7, accuracy=40.0)
    with pytest.raises(ValueError, match=r"unknown metrics config key\(s\) \['prot'\]"):
        ExporterOptions.from_dict({"prot": 9400})
    assert ExporterOptions.from_dict({"port": 9500}).port == 9500
    with pytest.raises(ValueError, match="metrics port must be in"):
        ExporterOptions(port=70000)
    with pytest.raises(ValueError, match="clash with the worker labels"):
        MetricsExporter(stage="stage1", expert="base", config=OFFLINE, run_info={"rank": "0"})
    with pytest.raises(ValueError, match="rank must be an int"):
        MetricsExporter(stage="stage1", expert="base", rank=-1, config=OFFLINE)


def test_busy_port_moves_to_the_next_and_logs_the_chosen_one(caplog):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        if busy >= 65530:
            pytest.skip("the OS handed out a port at the top of the range; nothing above it to try")
        caplog.set_level(logging.INFO, logger="mmrec.metrics")
        config = ExporterOptions(port=busy, port_search=4, host="127.0.0.1")
        with MetricsExporter(stage="stage1", expert="base", rank=0, config=config) as first, MetricsExporter(
            stage="stage1", expert="base", rank=1, config=config
        ) as second:
            assert busy < first.port < second.port <= busy + 3
            assert f"127.0.0.1:{first.port}" in caplog.text and f"127.0.0.1:{second.port}" in caplog.text
            step(first)
            # Two exporters in one process keep separate registries: each serves its own rank.
            body = urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics", timeout=5).read().decode()
            assert 'mmrec_train_loss{expert="base",rank="0",stage="stage1"} 2.5' in body
            other = urllib.request.urlopen(f"http://127.0.0.1:{second.port}/metrics", timeout=5).read().decode()
            assert "mmrec_train_loss{" not in other and 'rank="1"' in other


def test_exhausted_port_range_says_what_to_do():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        with pytest.raises(PortRangeExhaustedError, match="no free metrics port .* raise port_search"):
            MetricsExporter(stage="stage1", expert="base", config=ExporterOptions(port=busy, port_search=1, host="127.0.0.1"))


@pytest.mark.gpu
def test_gpu_memory_is_exported_once_cuda_is_in_use():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    v = samples(MetricsExporter(stage="stage1", expert="base", config=OFFLINE))
    assert one(v, names.GPU_ALLOCATED, device="0") >= block.numel()
    assert one(v, names.GPU_RESERVED, device="0") >= one(v, names.GPU_ALLOCATED, device="0")


def test_metrics_package_imports_neither_ray_nor_the_model():
    import ast
    from pathlib import Path

    import mmrec.metrics

    forbidden = ("ray", "mmrec.model", "mmrec.train", "cluster", "torch")
    for source in Path(mmrec.metrics.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        bad = [m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{source.name} imports {bad}; the hooks take plain numbers"
