"""The /metrics HTTP endpoint, bound to the first free port of a small range.

Several training workers share a host (one per GPU), so a fixed port would collide. Each
worker tries `port, port + 1, ...` and keeps the first it can bind; the PodMonitor in k8s/
lists the same range by name.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class PortRangeExhaustedError(OSError):
    pass


@dataclasses.dataclass
class MetricsServer:
    httpd: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @classmethod
    def start(cls, registry: CollectorRegistry, *, host: str, port: int, port_search: int) -> MetricsServer:
        candidates = [0] if port == 0 else list(range(port, port + port_search))
        for candidate in candidates:
            try:
                httpd, thread = start_http_server(candidate, addr=host, registry=registry)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                log.info("metrics port %d on %s is in use, trying the next one", candidate, host)
                continue
            bound = httpd.server_address[1]
            log.info("metrics server listening on %s:%d", host, bound)
            return cls(httpd=httpd, thread=thread, host=host, port=bound)
        raise PortRangeExhaustedError(
            errno.EADDRINUSE,
            f"no free metrics port on {host} in {candidates[0]}..{candidates[-1]}: raise port_search, "
            "pick another base port, or stop the processes holding them",
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
