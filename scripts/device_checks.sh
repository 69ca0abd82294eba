#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (issue 11/12): the compiled-kernel tests and the GPU
# benchmarks, with the device named in the output. Run on a machine with a GPU after `make setup`
# with a CUDA build of torch (or in the GPU image):
#   bash scripts/device_checks.sh 2>&1 | tee runs/device_checks.txt
# Record the tables in docs/benchmarks.md with the device line this prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: these checks need a GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
"$PY" -m pytest -q tests/kernels/test_scan_cuda.py tests/kernels/test_delta_cuda.py
"$PY" -m benchmarks.kernels --device cuda --op all --skip-loop
"$PY" -m benchmarks.model --device cuda --bf16 --batch 8 --lengths 2048 4096 8192 16384
