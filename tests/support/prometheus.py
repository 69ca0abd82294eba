"""A real Prometheus server for tests: the Debian `prometheus` binary on loopback with a temp data dir,
started and stopped by PID. Nothing here mocks it."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.ray_head import free_port


def require_binary(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        # A missing tool is a broken setup, not a reason to skip: fail with the fix.
        pytest.fail(f"`{name}` is not on PATH; {install_hint}")
    return path


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; raises with Prometheus' error text when the expression is invalid."""
        try:
            return self.api("query", query=expr)["result"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"Prometheus rejected {expr!r}: {error.read().decode()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_prometheus(
    tmp_dir: Path, *, targets: list[str], rule_files: list[Path], file_sd: list[Path] = ()
) -> PrometheusServer:
    """Scrapes `targets` (job mmrec) and the targets in Ray-style service-discovery files (job ray)."""
    port = free_port()
    scrape_configs = [{"job_name": "mmrec", "static_configs": [{"targets": targets}]}]
    if file_sd:
        scrape_configs.append({"job_name": "ray", "file_sd_configs": [{"files": [str(p) for p in file_sd]}]})
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": scrape_configs,
    }
    config_path = tmp_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_dir / "prometheus.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                require_binary("prometheus", "install it with `bash scripts/setup_system.sh`"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    stop_prometheus(server)
    raise RuntimeError(f"prometheus did not become ready within 60 s:\n{server.log()}")


def stop_prometheus(server: PrometheusServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()  # by PID, via the Popen handle we started
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
