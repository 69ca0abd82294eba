"""Process and GPU memory, read at scrape time by a custom Prometheus collector.

Reading at scrape time (instead of in the step hook) keeps the numbers current while a worker
is blocked in a long checkpoint or data wait, which is exactly when memory questions come up.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mmrec.metrics import names


class MemoryCollector(Collector):
    """Resident set size of this process and, when CUDA is in use, allocated/reserved bytes."""

    def __init__(self, worker_labels: dict[str, str]):
        self._label_names = list(worker_labels)
        self._label_values = list(worker_labels.values())
        self._process = psutil.Process()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rss = GaugeMetricFamily(
            names.RESIDENT_MEMORY, "Resident set size of the worker process.", labels=self._label_names
        )
        rss.add_metric(self._label_values, float(self._process.memory_info().rss))
        yield rss

        # Only look at torch if the worker already imported it and initialised CUDA: importing
        # it here would cost seconds, and touching CUDA from the scrape thread would create a
        # context on a device the worker may not own.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        device_labels = [*self._label_names, "device"]
        allocated = GaugeMetricFamily(
            names.GPU_ALLOCATED, "Bytes held by live tensors on the GPU.", labels=device_labels
        )
        reserved = GaugeMetricFamily(
            names.GPU_RESERVED, "Bytes reserved by PyTorch's caching allocator on the GPU.", labels=device_labels
        )
        for device in range(torch.cuda.device_count()):
            values = [*self._label_values, str(device)]
            allocated.add_metric(values, float(torch.cuda.memory_allocated(device)))
            reserved.add_metric(values, float(torch.cuda.memory_reserved(device)))
        yield allocated
        yield reserved
