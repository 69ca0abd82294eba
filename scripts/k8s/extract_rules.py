"""Write the rule groups of a PrometheusRule as a plain Prometheus rules file.

k8s/monitoring/rules.yaml (a PrometheusRule for the Prometheus operator) is the one source of
truth for the alerts; a Prometheus without the operator, and `promtool`, want the bare
`groups:` document, which this extracts:

    python scripts/k8s/extract_rules.py k8s/monitoring/rules.yaml /etc/prometheus/mmrec-rules.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml


def rule_groups(prometheus_rule_path: Path) -> dict:
    """The `{"groups": [...]}` document held by the PrometheusRule at that path."""
    document = yaml.safe_load(prometheus_rule_path.read_text())
    if not isinstance(document, dict) or document.get("kind") != "PrometheusRule":
        raise ValueError(f"{prometheus_rule_path} is not a PrometheusRule (kind: {document.get('kind') if isinstance(document, dict) else None!r})")
    groups = (document.get("spec") or {}).get("groups")
    if not groups:
        raise ValueError(f"{prometheus_rule_path} has no spec.groups: nothing to extract")
    return {"groups": groups}


def write_rules_file(prometheus_rule_path: Path, out_path: Path) -> None:
    text = f"# Generated from {prometheus_rule_path.name} by {Path(__file__).name}; edit that file instead.\n"
    text += yaml.safe_dump(rule_groups(prometheus_rule_path), sort_keys=False, width=120)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory, then rename: a reader never sees half a rules file.
    with tempfile.NamedTemporaryFile("w", dir=out_path.parent, prefix=f".{out_path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prometheus_rule", type=Path, help="a PrometheusRule YAML file")
    parser.add_argument("out", type=Path, help="where to write the plain rules file")
    args = parser.parse_args(argv)
    try:
        write_rules_file(args.prometheus_rule, args.out)
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"extract_rules: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
