#!/usr/bin/env bash
# Make `kubectl` (with its built-in `kubectl kustomize`) available for the k8s/ tests and for
# deploying. Idempotent: a no-op when a kubectl that can run kustomize is already on PATH.
# The source is Debian's `kubernetes-client` package (kubectl 1.20 with kustomize 2.0), the
# one registry kubectl reachable from CI; the manifests in k8s/ build identically with it and
# with current kubectl/kustomize 5.
set -euo pipefail
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "kubectl is missing: run this script as root, or install it yourself (apt-get install kubernetes-client)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
kubectl version --client >/dev/null
