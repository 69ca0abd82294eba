"""`kernels.scan`: path selection, bad-input errors, and agreement between paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.scan.cpu import scan_cpu

REPO = Path(__file__).resolve().parents[2]


def _inputs(B=2, T=5, D=3, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    log_a = -torch.rand(B, T, D, generator=generator).to(device=device, dtype=dtype)
    x = torch.randn(B, T, D, generator=generator).to(device=device, dtype=dtype)
    h0 = torch.randn(B, D, generator=generator).to(device=device, dtype=dtype)
    return log_a, x, h0


def test_cpu_tensors_take_the_cpu_path():
    log_a, x, h0 = _inputs()
    h, h_last = kernels.scan(log_a.requires_grad_(True), x, h0)
    assert type(h.grad_fn).__name__ == "ChunkedScanFunctionBackward"
    expected, expected_last = scan_cpu(log_a, x, h0)
    assert torch.equal(h, expected) and torch.equal(h_last, expected_last)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_forced_backends_agree(backend, make_case, check_against_reference):
    case = make_case(2, 37, 17, mode="mixed")
    check_against_reference(lambda a, x, h0: kernels.scan(a, x, h0, backend=backend), case, 1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (no GPU)")
def test_triton_backend_on_cpu_runs_interpreted(make_case, check_against_reference):
    case = make_case(1, 9, 3, mode="mixed")
    check_against_reference(lambda a, x, h0: kernels.scan(a, x, h0, backend="triton"), case, 1e-5)


def test_non_contiguous_inputs(generator):
    # [B, D, T] storage viewed as [B, T, D]: the entry point must not read it as contiguous.
    log_a = (-torch.rand(2, 6, 40, generator=generator)).transpose(1, 2)
    x = torch.randn(2, 6, 40, generator=generator).transpose(1, 2)
    h, _ = kernels.scan(log_a, x)
    expected, _ = kernels.scan(log_a.contiguous(), x.contiguous())
    assert torch.equal(h, expected)


def test_half_precision_returns_input_dtype():
    log_a, x, h0 = _inputs(dtype=torch.bfloat16)
    for backend in ("cpu", "reference"):
        h, h_last = kernels.scan(log_a, x, h0, backend=backend)
        assert h.dtype == torch.bfloat16 and h_last.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a, x, h0: (a, x, h0, {"backend": "cuda"}), "unknown backend 'cuda'"),
        (lambda a, x, h0: (a[:, :4], x, h0, {}), r"log_a and x must have the same shape"),
        (lambda a, x, h0: (a[0], x[0], h0, {}), r"x must have shape \[B, T, D\]"),
        (lambda a, x, h0: (a, x, h0[:, :2], {}), r"h0 must have shape \[B, D\]"),
        (lambda a, x, h0: (a[:, :0], x[:, :0], h0, {}), r"the sequence is empty"),
        (lambda a, x, h0: (a.double(), x, h0, {}), r"inputs must share one dtype"),
        (lambda a, x, h0: (a, x, h0.half(), {}), r"inputs must share one dtype"),
        (lambda a, x, h0: (a.long(), x.long(), h0.long(), {}), r"x has dtype torch.int64"),
        (lambda a, x, h0: (a, x, h0.to("meta"), {}), r"inputs must be on one device"),
        (lambda a, x, h0: (a.numpy(), x, h0, {}), r"log_a must be a torch.Tensor"),
        (lambda a, x, h0: (a, x, h0.tolist(), {}), r"h0 must be None or a torch.Tensor"),
    ],
    ids=["backend", "shape", "rank", "h0_shape", "empty", "dtype", "h0_dtype", "int", "device", "numpy", "list"],
)
def test_bad_input_is_a_clear_value_error(mutate, message):
    log_a, x, h0, kwargs = mutate(*_inputs())
    with pytest.raises(ValueError, match=message):
        kernels.scan(log_a, x, h0, **kwargs)


def test_triton_on_cpu_without_interpreter_is_refused():
    # A fresh interpreter without TRITON_INTERPRET, so Triton is imported in compiled mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, kernels\n"
        "try:\n"
        "    kernels.scan(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), backend='triton')\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError: scan: backend='triton' needs CUDA tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout
