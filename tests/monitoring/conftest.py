"""Fixtures for the monitoring tests: a real Prometheus server and the promtool/kubectl binaries.

Prometheus is the Debian `prometheus` binary started by hand on loopback with a temp data dir
and stopped by PID; nothing here mocks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ray_head import free_port  # noqa: F401 (also used by this area's tests)
from tests.support.prometheus import (  # noqa: F401 (used by this area's tests)
    PrometheusServer, require_binary, start_prometheus, stop_prometheus,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
RULES = K8S / "monitoring" / "rules.yaml"
EXTRACT_RULES = REPO / "scripts" / "k8s" / "extract_rules.py"


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool", "install it with `bash scripts/setup_system.sh` (Debian package prometheus)")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_binary("kubectl", "install it with `bash scripts/k8s/install_kubectl.sh`")


@pytest.fixture(scope="session")
def plain_rules_file(tmp_path_factory) -> Path:
    """The PrometheusRule's groups as a plain rules file, produced by the shipped extractor."""
    out = tmp_path_factory.mktemp("rules") / "mmrec-rules.yaml"
    subprocess.run([sys.executable, str(EXTRACT_RULES), str(RULES), str(out)], check=True)
    return out


