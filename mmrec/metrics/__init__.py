"""Prometheus metrics for training workers (see docs/monitoring.md).

`MetricsExporter` implements the trainer's metrics hooks and serves them on /metrics; the
dashboard generator and the alert-rule extraction live beside it. Nothing here imports the
model or Ray: the hooks receive plain numbers.
"""

from mmrec.metrics.exporter import ExporterOptions, MetricsExporter
from mmrec.metrics.server import PortRangeExhaustedError

__all__ = ["ExporterOptions", "MetricsExporter", "PortRangeExhaustedError"]
