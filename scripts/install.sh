#!/usr/bin/env bash
# The one install recipe for MM-Rec: `make setup` runs it into .venv, docker/Dockerfile into the
# Ray image's Python, so a local run and the cluster image cannot drift apart.
#
#   bash scripts/install.sh PYTHON EXTRAS        e.g. bash scripts/install.sh .venv/bin/python data,cluster
#
# Every step goes through constraints.txt (the pins: torch, deepspeed, ray, ...). Environment:
#   TORCH_INDEX_URL  the index torch comes from; unset: pip's own configuration. The CPU image sets
#                    PyTorch's CPU index, the GPU image PyPI (whose Linux torch is the CUDA build).
#   DS_ACCELERATOR   read by DeepSpeed's build: the accelerator its pre-built ops are for (the
#                    image build has no GPU to detect, so the GPU image sets cuda).
#   CXX              the C++ compiler of the op build; the image sets docker/portable-cxx.sh.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 PYTHON EXTRAS" >&2
  exit 2
fi
python=$1
extras=$2
cd "$(dirname "$0")/.."
pip=("$python" -m pip install -q -c constraints.txt)

"${pip[@]}" --upgrade pip setuptools wheel
# Torch first, alone, at its pinned version: DeepSpeed builds against it and everything after
# resolves against the build already installed instead of pulling another one.
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
# DeepSpeed's CPU Adam and shared-memory comm ops are compiled here, once, instead of
# JIT-compiling (2-3 min) inside the first training job of every fresh machine or pod.
DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
  "${pip[@]}" --no-build-isolation --no-cache-dir deepspeed
# Editable, as in the checkout: the image keeps the code where the RayJobs run it.
"${pip[@]}" --no-build-isolation -e ".[$extras]"
