#!/usr/bin/env bash
# System packages the tests drive as real servers/tools. Idempotent; a no-op when present.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# A C compiler: kernels.c_build compiles the CPU kernels (kernels/*/*.c) on first use (without
# one they fall back to torch ops, slower, with a warning).
{ command -v cc || command -v gcc || command -v g++; } >/dev/null 2>&1 || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or install them: apt-get install ${need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# kubectl (for `kubectl kustomize` in the k8s tests): its own script knows where to get it.
bash "$(dirname "$0")/k8s/install_kubectl.sh"
