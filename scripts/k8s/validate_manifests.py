"""Validate Kubernetes manifests offline, strictly: unknown or misspelled fields are errors.

Core kinds go through kubernetes-validate's bundled strict schemas; the custom resources
(RayCluster, RayJob, PodMonitor, PrometheusRule) through our schemas in k8s/schemas/, whose pod
templates and metadata point at the same strict core definitions. Kinds with no schema are
errors too, so nothing passes unchecked.

    kubectl kustomize k8s/overlays/gpu | python scripts/k8s/validate_manifests.py -
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "k8s" / "schemas"
CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster.json",
    ("ray.io/v1", "RayJob"): "rayjob.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}
# The Kubernetes version whose strict schemas the manifests must satisfy.
KUBERNETES_VERSION = "1.32.0"


def _custom_validators(version: str) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    major_minor = ".".join(version.split(".")[:2])
    definitions = schema_contents(f"kubernetes-json-schema/v{major_minor}.0-local-strict/_definitions.json", version)
    schemas = {key: json.loads((SCHEMA_DIR / name).read_text()) for key, name in CUSTOM_SCHEMAS.items()}
    registry = Registry().with_resources(
        [(definitions["$id"], Resource.from_contents(definitions))]
        + [(schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()]
    )
    return {key: jsonschema.Draft202012Validator(schema, registry=registry) for key, schema in schemas.items()}


def _where(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".") or "(top level)"


def validate_documents(documents: Iterable[dict], version: str = KUBERNETES_VERSION) -> list[str]:
    """One message per problem, naming the object and the field; empty when all are valid."""
    custom = _custom_validators(version)
    problems = []
    for doc in documents:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"not a Kubernetes object (no apiVersion/kind): {str(doc)[:80]}")
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
        validator = custom.get((doc["apiVersion"], doc["kind"]))
        if validator is not None:
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                problems.append(f"{name}: {_where(error)}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{name}: no schema for {doc['apiVersion']} {doc['kind']}: add one to k8s/schemas/ "
                "and CUSTOM_SCHEMAS, or fix apiVersion/kind"
            )
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{name}: {_where(error)}: {error.message}")
    return problems


def load_documents(texts: Iterable[str]) -> Iterator[dict]:
    for text in texts:
        yield from (doc for doc in yaml.safe_load_all(text) if doc is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="YAML files, or - for standard input")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    if args.kubernetes_version.split(".")[:2] > latest_version().split(".")[:2]:
        print(f"validate_manifests: kubernetes-validate knows versions up to {latest_version()}", file=sys.stderr)
        return 2
    texts = [sys.stdin.read() if f == "-" else Path(f).read_text() for f in args.files]
    documents = list(load_documents(texts))
    problems = validate_documents(documents, args.kubernetes_version)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"{len(documents)} objects valid (strict, Kubernetes {args.kubernetes_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
