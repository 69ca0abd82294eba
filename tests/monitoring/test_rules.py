"""Alert rules: promtool checks them and runs their unit tests against the extracted groups."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import EXTRACT_RULES, RULES

RULES_TEST = Path(__file__).with_name("rules_test.yaml")
REQUIRED_ALERTS = {
    "MMRecLossNotFinite", "MMRecNaNRollbacks", "MMRecThroughputCollapse", "MMRecNoProgress",
    "MMRecRestarts", "MMRecDataWaitHigh", "MMRecCheckpointTooOld",
}


def test_prometheus_rule_carries_every_required_alert():
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert alerts == REQUIRED_ALERTS


def test_extracted_groups_equal_the_prometheus_rule_spec(plain_rules_file):
    assert yaml.safe_load(plain_rules_file.read_text()) == {"groups": yaml.safe_load(RULES.read_text())["spec"]["groups"]}


def test_promtool_check_rules(promtool, plain_rules_file):
    check = subprocess.run([promtool, "check", "rules", str(plain_rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in check.stdout


def test_promtool_test_rules(promtool, plain_rules_file, tmp_path):
    shutil.copy(plain_rules_file, tmp_path / "mmrec-rules.yaml")
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    run = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every alert has at least one firing expectation in the unit tests.
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert fired == REQUIRED_ALERTS


def test_extractor_refuses_a_file_that_is_not_a_prometheus_rule(tmp_path):
    not_a_rule = tmp_path / "configmap.yaml"
    not_a_rule.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    out = tmp_path / "out.yaml"
    run = subprocess.run([sys.executable, str(EXTRACT_RULES), str(not_a_rule), str(out)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "is not a PrometheusRule (kind: 'ConfigMap')" in run.stderr
    assert not out.exists()
