"""Prometheus exporter for one training worker: the trainer's metrics hooks, served on /metrics.

Each exporter owns its own CollectorRegistry (never the process-global one), so several
workers, or several tests, can live in one process without their series colliding. Stage,
expert and rank are fixed in the constructor and become labels on every series. The hooks take
plain numbers: this package knows nothing about the model or Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from mmrec.metrics import names
from mmrec.metrics.memory import MemoryCollector
from mmrec.metrics.server import MetricsServer

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclasses.dataclass(frozen=True)
class ExporterOptions:
    """Where and how a worker serves its metrics.

    port: first port tried; 0 lets the OS pick any free port. When the port is taken the next
      ones are tried, `port_search` in all, so several workers on one host need no setup.
    host: interface to bind; 0.0.0.0 so that Prometheus in another pod can scrape it.
    peak_flops_per_second: the hardware's peak (e.g. 989e12 for an H100 in bf16 dense) for the
      MFU estimate; None exports no MFU rather than a made-up one.
    serve: False builds the registry without an HTTP server (exposition() still works).
    """

    port: int = 9400
    port_search: int = 16
    host: str = "0.0.0.0"
    peak_flops_per_second: float | None = None
    serve: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.port}")
        if self.port_search < 1:
            raise ValueError(f"metrics port_search must be >= 1 (ports to try), got {self.port_search}")
        if self.port and self.port + self.port_search - 1 > 65535:
            raise ValueError(
                f"metrics ports {self.port}..{self.port + self.port_search - 1} run past 65535: "
                "lower port or port_search"
            )
        if self.peak_flops_per_second is not None and not self.peak_flops_per_second > 0:
            raise ValueError(
                f"peak_flops_per_second must be > 0 or None (no MFU), got {self.peak_flops_per_second}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExporterOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown metrics config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


class _UnsetGauge:
    """One labelled child of a gauge, created on the first set() so it has no value before."""

    def __init__(self, family: Gauge, labels: dict[str, str]):
        self._family = family
        self._labels = labels
        self._child: Gauge | None = None

    def set(self, value: float) -> None:
        if self._child is None:  # labels() is a locked dict lookup: do it once
            self._child = self._family.labels(**self._labels)
        self._child.set(value)


def _require_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:  # also rejects NaN: a NaN duration or count is a bug upstream
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


class MetricsExporter:
    """Implements the trainer's metrics hooks and serves them for Prometheus.

    >>> exporter = MetricsExporter(stage="stage1", expert="base", rank=0)
    >>> exporter.on_step(step=1, loss=7.1, lr=3e-4, ...)        # from the training loop
    >>> exporter.url                                           # http://0.0.0.0:9400/metrics
    """

    def __init__(
        self,
        *,
        stage: str,
        expert: str,
        rank: int = 0,
        config: ExporterOptions | None = None,
        run_info: Mapping[str, str] | None = None,
    ):
        for label, value in (("stage", stage), ("expert", expert)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string, got {value!r}")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.config = config or ExporterOptions()
        self.worker_labels = {"stage": stage, "expert": expert, "rank": str(rank)}
        self.registry = CollectorRegistry(auto_describe=True)
        self._define_metrics()
        self._set_run_info(run_info or {})
        self.registry.register(MemoryCollector(self.worker_labels))
        self._server: MetricsServer | None = None
        if self.config.serve:
            self._server = MetricsServer.start(
                self.registry, host=self.config.host, port=self.config.port, port_search=self.config.port_search
            )
            log.info(
                "metrics for stage=%s expert=%s rank=%s served at %s", stage, expert, rank, self._server.url
            )

    # -- construction -------------------------------------------------------------------------

    def _define_metrics(self) -> None:
        labels = list(names.WORKER_LABELS)
        reg = self.registry
        w = self.worker_labels

        def gauge(name: str, doc: str) -> _UnsetGauge:
            # Not bound until first set: a gauge exported as 0 before any value would read as
            # "checkpoint saved in 1970" or "validation loss 0" to dashboards and alerts.
            return _UnsetGauge(Gauge(name, doc, labels, registry=reg), w)

        def counter(name: str, doc: str) -> Counter:
            # Bound at construction so the series is exported at 0 before the first event:
            # increase() can then see the first restart of a long-lived series.
            return Counter(name, doc, labels, registry=reg).labels(**w)

        self._loss = gauge(names.TRAIN_LOSS, "Training loss (mean cross-entropy, nats) of the last step.")
        self._lr = gauge(names.LEARNING_RATE, "Learning rate used by the last optimizer step.")
        self._grad_norm = gauge(names.GRAD_NORM, "Global gradient L2 norm before clipping.")
        self._step = gauge(names.TRAIN_STEP, "Last completed optimizer step.")
        self._last_step_time = gauge(names.LAST_STEP_TIMESTAMP, "Unix time at which the last step completed.")
        self._start_time = gauge(names.START_TIME, "Unix time at which this worker's exporter started.")
        self._start_time.set(time.time())

        self._val_loss = gauge(names.VALIDATION_LOSS, "Validation loss (nats) of the last evaluation.")
        self._val_ppl = gauge(names.VALIDATION_PERPLEXITY, "Validation perplexity of the last evaluation.")
        self._val_acc = gauge(names.VALIDATION_ACCURACY, "Validation next-token accuracy (0..1).")
        self._val_step = gauge(names.VALIDATION_STEP, "Training step of the last evaluation.")

        self._tokens = counter(names.TOKENS, "Tokens trained on by this worker.")
        self._samples = counter(names.SAMPLES, "Samples (sequences) trained on by this worker.")
        self._tokens_per_s = gauge(names.TOKENS_PER_SECOND, "Tokens per second of the last step.")
        self._samples_per_s = gauge(names.SAMPLES_PER_SECOND, "Samples per second of the last step.")
        self._mfu = gauge(names.MFU, "Model FLOPs utilisation of the last step (0..1), from the configured peak.")

        self._step_duration = Histogram(
            names.STEP_DURATION, "Wall time of one training step.", labels, buckets=STEP_BUCKETS, registry=reg
        ).labels(**w)
        phase_counter = Counter(
            names.STEP_PHASE, "Time spent in each phase of the training step.", [*labels, "phase"], registry=reg
        )
        self._phases = {phase: phase_counter.labels(**w, phase=phase) for phase in names.STEP_PHASES}

        checkpoint_hist = Histogram(
            names.CHECKPOINT_DURATION,
            "Wall time of checkpoint saves and loads.",
            [*labels, "kind"],
            buckets=CHECKPOINT_BUCKETS,
            registry=reg,
        )
        checkpoint_last = Gauge(
            names.CHECKPOINT_LAST_DURATION, "Wall time of the last checkpoint save/load.", [*labels, "kind"], registry=reg
        )
        self._checkpoint_hist = {k: checkpoint_hist.labels(**w, kind=k) for k in names.CHECKPOINT_KINDS}
        self._checkpoint_last = {k: _UnsetGauge(checkpoint_last, {**w, "kind": k}) for k in names.CHECKPOINT_KINDS}
        self._checkpoint_step = gauge(names.CHECKPOINT_LAST_STEP, "Step of the last checkpoint saved or loaded.")
        self._checkpoint_saved_at = gauge(
            names.CHECKPOINT_LAST_SAVE_TIMESTAMP, "Unix time at which the last checkpoint save finished."
        )

        self._restarts = counter(names.RESTARTS, "Times this worker resumed after a failure.")
        self._nan_rollbacks = counter(names.NAN_ROLLBACKS, "Rollbacks to the last good checkpoint after a NaN/Inf loss.")
        self._corrupt_shards = counter(names.CORRUPT_SHARDS, "Data shards skipped because they were corrupt.")

        self._h_norm = Gauge(
            names.STATE_H_NORM, "L2 norm of the recurrent state h per layer.", [*labels, "layer"], registry=reg
        )
        self._layer_gauges: dict[Gauge, list[_UnsetGauge]] = {}
        self._memory_norm = Gauge(
            names.STATE_MEMORY_NORM, "L2 norm of the long-term memory M per layer.", [*labels, "layer"], registry=reg
        )

    def _set_run_info(self, run_info: Mapping[str, str]) -> None:
        clashing = sorted(set(run_info) & set(names.WORKER_LABELS))
        if clashing:
            raise ValueError(f"run_info keys {clashing} clash with the worker labels; pass them as arguments instead")
        info = Info(names.RUN, "Stage, expert, rank and configuration of this run.", list(names.WORKER_LABELS), registry=self.registry)
        info.labels(**self.worker_labels).info({str(k): str(v) for k, v in run_info.items()})

    # -- hooks called by the trainer --------------------------------------------------------

    def on_step(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        samples: int,
        step_seconds: float,
        data_wait_seconds: float,
        forward_backward_seconds: float,
        optimizer_seconds: float,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        """One optimizer step of this worker: `tokens` and `samples` are what this worker consumed.

        MFU = flops_per_token x this worker's tokens/s / the peak FLOP/s of its device (`peak_flops`,
        else the configured one); no MFU is exported when neither is known.
        """
        _require_non_negative(
            step=step,
            tokens=tokens,
            samples=samples,
            data_wait_seconds=data_wait_seconds,
            forward_backward_seconds=forward_backward_seconds,
            optimizer_seconds=optimizer_seconds,
        )
        if not step_seconds > 0:
            raise ValueError(f"step_seconds must be > 0 (measured wall time of the step), got {step_seconds}")
        # loss and grad_norm may be NaN/Inf: exporting them as they are is what lets the
        # "loss not finite" alert fire.
        self._loss.set(loss)
        self._lr.set(lr)
        self._grad_norm.set(grad_norm)
        self._step.set(step)
        self._tokens.inc(tokens)
        self._samples.inc(samples)
        tokens_per_second = tokens / step_seconds
        self._tokens_per_s.set(tokens_per_second)
        self._samples_per_s.set(samples / step_seconds)
        peak = peak_flops or self.config.peak_flops_per_second
        if flops_per_token is not None and peak:
            self._mfu.set(flops_per_token * tokens_per_second / peak)
        self._step_duration.observe(step_seconds)
        self._phases["data_wait"].inc(data_wait_seconds)
        self._phases["forward_backward"].inc(forward_backward_seconds)
        self._phases["optimizer"].inc(optimizer_seconds)
        self._last_step_time.set(time.time())

    def on_eval(self, *, step: int, loss: float, perplexity: float, accuracy: float) -> None:
        _require_non_negative(step=step)
        if not (0.0 <= accuracy <= 1.0):
            raise ValueError(f"accuracy must be a ratio in 0..1, got {accuracy}")
        self._val_loss.set(loss)
        self._val_ppl.set(perplexity)
        self._val_acc.set(accuracy)
        self._val_step.set(step)

    def on_checkpoint(self, *, kind: str, seconds: float, step: int) -> None:
        if kind not in names.CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind must be one of {names.CHECKPOINT_KINDS}, got {kind!r}")
        _require_non_negative(seconds=seconds, step=step)
        self._checkpoint_hist[kind].observe(seconds)
        self._checkpoint_last[kind].set(seconds)
        self._checkpoint_step.set(step)
        if kind == "save":
            self._checkpoint_saved_at.set(time.time())

    def on_state_norms(self, *, h_norms: list[float], memory_norms: list[float]) -> None:
        for family, norms in ((self._h_norm, h_norms), (self._memory_norm, memory_norms)):
            children = self._layer_gauges.setdefault(family, [])
            while len(children) < len(norms):
                children.append(_UnsetGauge(family, {**self.worker_labels, "layer": str(len(children))}))
            for child, norm in zip(children, norms):
                child.set(norm)

    def on_restart(self) -> None:
        self._restarts.inc()

    def on_nan_rollback(self) -> None:
        self._nan_rollbacks.inc()

    def on_corrupt_shard(self) -> None:
        self._corrupt_shards.inc()

    # -- serving ----------------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The port actually bound (after skipping busy ones), or None when not serving."""
        return self._server.port if self._server else None

    @property
    def url(self) -> str | None:
        return self._server.url if self._server else None

    def exposition(self) -> bytes:
        """The text the /metrics endpoint serves right now."""
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def exporter_for(cfg: Any, *, rank: int, world_size: int) -> MetricsExporter | None:
    """The exporter of one training worker of `cfg` (a core.config.Config) when [metrics] enabled = true."""
    if not cfg.metrics.enabled:
        return None
    from core.stages import get_stage

    return MetricsExporter(
        stage=cfg.stage, expert=get_stage(cfg.stage).trains, rank=rank, config=ExporterOptions(port=cfg.metrics.port),
        run_info={"run": cfg.run_name, "engine": cfg.engine.kind, "zero_stage": str(cfg.engine.zero_stage),
                  "world_size": str(world_size), "precision": cfg.train.precision},
    )
