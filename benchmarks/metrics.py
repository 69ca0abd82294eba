"""Cost of the metrics hooks, measured: `python -m benchmarks.metrics`.

Compares one `MetricsExporter.on_step` (validation, 16 series updated) with the same updates
made directly on prometheus_client objects (the floor any exporter pays), and times a scrape
(`exposition()`) of a worker with 24 layers of state norms. Prints a table; asserts nothing.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmrec.metrics import ExporterOptions, MetricsExporter

STEP = dict(
    step=1, loss=2.5, lr=3e-4, grad_norm=0.7, tokens=65536, samples=32, step_seconds=0.5,
    data_wait_seconds=0.01, forward_backward_seconds=0.4, optimizer_seconds=0.09, flops_per_token=6e8,
)


def _per_call_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def _bare_prometheus_client():
    reg = CollectorRegistry()
    labels = dict(stage="stage1", expert="base", rank="0")
    names = ["loss", "lr", "grad", "step", "last", "tps", "sps", "mfu"]
    gauges = [Gauge(f"g_{n}", n, list(labels), registry=reg).labels(**labels) for n in names]
    counters = [Counter(f"c_{n}", n, list(labels), registry=reg).labels(**labels) for n in ("tok", "smp", "dw", "fb", "opt")]
    hist = Histogram("h_step", "step", list(labels), registry=reg).labels(**labels)

    def update():
        for gauge in gauges:
            gauge.set(1.0)
        for counter in counters:
            counter.inc(1.0)
        hist.observe(0.5)
        gauges[4].set(time.time())

    return update


def main() -> None:
    exporter = MetricsExporter(stage="stage1", expert="base", config=ExporterOptions(serve=False, peak_flops_per_second=1e15))
    exporter.on_state_norms(h_norms=[1.0] * 24, memory_norms=[1.0] * 24)
    ours = _per_call_seconds(lambda: exporter.on_step(**STEP), 20_000)
    bare = _per_call_seconds(_bare_prometheus_client(), 20_000)
    norms = _per_call_seconds(lambda: exporter.on_state_norms(h_norms=[1.0] * 24, memory_norms=[1.0] * 24), 5_000)
    scrape = _per_call_seconds(exporter.exposition, 200)
    rows = [
        ("on_step (ours)", ours, "same updates, bare prometheus_client", bare),
        ("on_state_norms, 24 layers", norms, "", None),
        ("scrape (exposition), 24 layers", scrape, "", None),
    ]
    print(f"{'operation':34} {'ours us':>9}  {'baseline':38} {'base us':>9} {'ratio':>6}")
    for name, seconds, base_name, base in rows:
        ratio = f"{seconds / base:6.2f}" if base else "     -"
        base_text = f"{base * 1e6:9.1f}" if base else "        -"
        print(f"{name:34} {seconds * 1e6:9.1f}  {base_name:38} {base_text} {ratio}")
    print(f"\non_step + on_state_norms per training step: {(ours + norms) * 1e6:.0f} us "
          f"({(ours + norms) / STEP['step_seconds'] * 100:.3f} % of a {STEP['step_seconds']} s step)")


if __name__ == "__main__":
    main()
