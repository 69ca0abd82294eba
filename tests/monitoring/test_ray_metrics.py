"""Ray's own metrics next to ours: a real local Ray exports on --metrics-export-port and writes
its Prometheus service-discovery file; a real Prometheus finds it through that file, and the
dashboard's Ray row returns data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import K8S, free_port, start_prometheus, stop_prometheus

pytestmark = pytest.mark.slow

# A driver process owns the local Ray instance: ray.shutdown() at its exit stops exactly the
# processes it started (never `ray stop`, which would end every Ray on the machine).
RAY_DRIVER = """
import sys, ray
# address="local": a new instance even when another Ray (another test's head) is running, which a
# bare ray.init() would join instead, refusing num_cpus.
ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_port=int(sys.argv[2]),
         _metrics_export_port=int(sys.argv[1]), _temp_dir=sys.argv[3])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def ray_instance():
    # Short path: Ray's Unix sockets live under it and must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="mmrec-ray-", dir="/tmp"))
    metrics_port = free_port()
    driver = subprocess.Popen(
        [sys.executable, "-c", RAY_DRIVER, str(metrics_port), str(free_port()), str(temp_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # another test's head, if any
    )
    try:
        output = []
        line = driver.stdout.readline()
        while line and line.strip() != "ready":
            output.append(line)
            line = driver.stdout.readline()
        if not line:
            pytest.fail(f"local Ray did not start (exit {driver.wait()}):\n{''.join(output[-40:])}")
        yield temp_dir, metrics_port
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_prometheus_finds_ray_through_its_service_discovery_file(ray_instance, tmp_path):
    temp_dir, metrics_port = ray_instance
    discovery = temp_dir / "prom_metrics_service_discovery.json"

    def targets() -> list[str]:
        try:
            return [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
            return []

    # Ray rewrites the file every few seconds; the node's metrics agent joins it once registered.
    deadline = time.monotonic() + 60
    while not any(t.endswith(f":{metrics_port}") for t in targets()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(t.endswith(f":{metrics_port}") for t in targets()), f"--metrics-export-port not listed: {targets()}"

    server = start_prometheus(tmp_path, targets=[], rule_files=[], file_sd=[discovery])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if server.query("ray_node_cpu_utilization") and server.query("ray_node_mem_used"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"no Ray node metrics scraped within 90 s:\n{server.log()}")
        dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
        (ray_row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "Ray cluster"]
        ray_panels = [p for p in dashboard["panels"] if p["gridPos"]["y"] > ray_row["gridPos"]["y"]]
        with_data = {p["title"] for p in ray_panels for t in p["targets"] if server.query(t["expr"])}
        # GPU panels stay empty on a CPU machine; the CPU and memory panels must show this node.
        assert {"Node CPU utilisation", "Node memory used"} <= with_data
        (memory,) = server.query("ray_node_mem_used")
        assert float(memory["value"][1]) > 100e6
    finally:
        stop_prometheus(server)
