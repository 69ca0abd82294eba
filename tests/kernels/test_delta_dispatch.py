"""`kernels.delta_rule`: path selection, bad-input errors, and agreement between paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.delta import BACKENDS
from kernels.delta.chunk import delta_rule_chunk

REPO = Path(__file__).resolve().parents[2]


def _inputs(B=2, H=3, T=5, Dk=4, Dv=6, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, Dk, generator=generator)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk, generator=generator), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=generator)
    log_alpha = -torch.rand(B, H, T, generator=generator)
    beta = torch.rand(B, H, T, generator=generator)
    state = torch.randn(B, H, Dv, Dk, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, log_alpha, beta, state)]


def test_backends():
    assert BACKENDS == ("triton", "chunk", "fused_recurrent", "reference")


def test_cpu_tensors_take_the_c_kernel_in_fp32_and_the_chunk_path_otherwise():
    q, k, v, log_alpha, beta, state = _inputs()
    o, final = kernels.delta_rule(q.requires_grad_(True), k, v, log_alpha, beta, state)
    assert type(o.grad_fn).__name__ == "DeltaRuleFusedRecurrentFunctionBackward"
    q, k, v, log_alpha, beta, state = _inputs(dtype=torch.float64)
    o, final = kernels.delta_rule(q.requires_grad_(True), k, v, log_alpha, beta, state)
    assert type(o.grad_fn).__name__ == "DeltaRuleChunkFunctionBackward"
    expected, expected_final = delta_rule_chunk(q, k, v, log_alpha, beta, state, 64)
    assert torch.equal(o, expected) and torch.equal(final, expected_final)


def test_without_a_compiler_fp32_takes_the_chunk_path_with_one_warning(tmp_path):
    code = (
        "import logging, torch, kernels\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))\n"
        "for _ in range(3): o, _ = kernels.delta_rule(q.requires_grad_(), k, v, -torch.rand(1, 2, 9), torch.rand(1, 2, 9))\n"
        "assert type(o.grad_fn).__name__ == 'DeltaRuleChunkFunctionBackward'\n"
        "try: kernels.delta_rule(q, k, v, -torch.rand(1, 2, 9), torch.rand(1, 2, 9), backend='fused_recurrent')\n"
        "except RuntimeError as error: print('forced:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CC": "/nonexistent/cc", "MMREC_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("C kernel fused_recurrent.c could not be built") == 1 and "/nonexistent/cc" in done.stderr
    assert "forced: delta_rule: the C kernel fused_recurrent.c could not be built: no C compiler" in done.stdout


def test_chunk_size_reaches_the_chunk_path():
    inputs = _inputs(T=40, dtype=torch.float64)
    o, final = kernels.delta_rule(*inputs, chunk_size=7)
    expected, expected_final = delta_rule_chunk(*inputs, 7)
    assert torch.equal(o, expected) and torch.equal(final, expected_final)


@pytest.mark.parametrize("backend", ["chunk", "fused_recurrent", "reference"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_forced_backends_agree(backend, with_state, make_delta_case, check_delta_against_reference):
    case = make_delta_case(2, 2, 37, 8, 12, mode="mixed", with_state=with_state)
    check_delta_against_reference(
        lambda *x: kernels.delta_rule(*x, chunk_size=16, backend=backend), case, 1e-5
    )


def test_reference_and_chunk_agree_on_a_model_shape(generator):
    # The model's shapes (Dk = Dv = 64, chunk 64) over several chunks, through the public entry point.
    B, H, T, D = 1, 2, 130, 64
    q = torch.randn(B, H, T, D, generator=generator)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=generator), dim=-1)
    v = torch.randn(B, H, T, D, generator=generator)
    log_alpha = -0.1 * torch.rand(B, H, T, generator=generator)
    beta = torch.rand(B, H, T, generator=generator)
    o, final = kernels.delta_rule(q, k, v, log_alpha, beta)
    o_ref, final_ref = kernels.delta_rule(q, k, v, log_alpha, beta, backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (no GPU)")
def test_triton_backend_on_cpu_runs_interpreted(make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 2, 20, 16, 16, mode="mixed")
    check_delta_against_reference(lambda *x: kernels.delta_rule(*x, chunk_size=16, backend="triton"), case, 1e-5)


def test_non_contiguous_inputs(generator):
    # [B, T, H, D] storage viewed as [B, H, T, D] (how a model's head split looks): not read as contiguous.
    B, T, H, Dk, Dv = 2, 30, 3, 8, 4
    q = torch.randn(B, T, H, Dk, generator=generator).transpose(1, 2)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=generator), dim=-1).transpose(1, 2)
    v = torch.randn(B, T, H, Dv, generator=generator).transpose(1, 2)
    log_alpha = -torch.rand(B, T, H, generator=generator).transpose(1, 2)
    beta = torch.rand(B, T, H, generator=generator).transpose(1, 2)
    o, final = kernels.delta_rule(q, k, v, log_alpha, beta, chunk_size=16)
    expected, expected_final = kernels.delta_rule(
        *(t.contiguous() for t in (q, k, v, log_alpha, beta)), chunk_size=16
    )
    assert torch.equal(o, expected) and torch.equal(final, expected_final)


@pytest.mark.parametrize("backend", ["chunk", "reference"])
@pytest.mark.parametrize(
    "dtype, state_dtype, final_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float64, torch.float64),
    ],
)
def test_output_dtypes(backend, dtype, state_dtype, final_dtype):
    *inputs, state = _inputs(dtype=dtype)
    leaf = state.to(state_dtype).requires_grad_(True)
    o, final = kernels.delta_rule(*inputs, leaf, backend=backend)
    assert o.dtype == dtype and final.dtype == final_dtype
    (grad,) = torch.autograd.grad(o.float().sum() + final.sum(), leaf)
    assert grad.dtype == state_dtype


def _bad(**changes):
    """Inputs with some arguments replaced, as (args, kwargs) for kernels.delta_rule."""
    q, k, v, log_alpha, beta, state = _inputs()
    args = dict(q=q, k=k, v=v, log_alpha=log_alpha, beta=beta, initial_state=state)
    kwargs = {}
    for name, change in changes.items():
        if name in args:
            args[name] = change(args[name])
        else:
            kwargs[name] = change
    return list(args.values()), kwargs


@pytest.mark.parametrize(
    "case, message",
    [
        (_bad(backend="cuda"), r"unknown backend 'cuda'"),
        (_bad(q=lambda t: t[0]), r"q must have shape \[B, H, T, Dk\], got \(3, 5, 4\)"),
        (_bad(k=lambda t: t[..., :3]), r"k must have shape \[B, H, T, Dk\] = \[2, 3, 5, 4\] like q, got \(2, 3, 5, 3\)"),
        (_bad(v=lambda t: t[:, :, :4]), r"v must have shape \[B, H, T, Dv\]"),
        (_bad(v=lambda t: t[..., :0]), r"v must have shape \[B, H, T, Dv\]"),
        (_bad(log_alpha=lambda t: t[..., None]), r"log_alpha must have shape \[B, H, T\] = \[2, 3, 5\]"),
        (_bad(beta=lambda t: t[:1]), r"beta must have shape \[B, H, T\] = \[2, 3, 5\]"),
        (_bad(initial_state=lambda t: t.transpose(-1, -2)), r"initial_state must have shape \[B, H, Dv, Dk\] = \[2, 3, 6, 4\]"),
        (_bad(q=lambda t: t[:, :, :0], k=lambda t: t[:, :, :0]), r"the sequence is empty \(T = 0\)"),
        (_bad(q=lambda t: t[..., :0], k=lambda t: t[..., :0]), r"key width Dk >= 1"),
        (_bad(k=lambda t: t.double()), r"q, k, v, log_alpha and beta must share one dtype"),
        (_bad(beta=lambda t: t.half()), r"q, k, v, log_alpha and beta must share one dtype"),
        (_bad(initial_state=lambda t: t.double()), r"initial_state has dtype torch.float64; with torch.float32 inputs it must be torch.float32"),
        (_bad(**{n: (lambda t: t.long()) for n in ("q", "k", "v", "log_alpha", "beta", "initial_state")}), r"v has dtype torch.int64"),
        (_bad(initial_state=lambda t: t.to("meta")), r"inputs must be on one device"),
        (_bad(log_alpha=lambda t: t.numpy()), r"log_alpha must be a torch.Tensor of shape \[B, H, T\]"),
        (_bad(q=lambda t: t.tolist()), r"q must be a torch.Tensor of shape \[B, H, T, Dk\]"),
        (_bad(initial_state=lambda t: t.tolist()), r"initial_state must be None or a torch.Tensor of shape \[B, H, Dv, Dk\]"),
        (_bad(chunk_size=0), r"chunk_size must be a positive int"),
        (_bad(chunk_size=16.0), r"chunk_size must be a positive int"),
    ],
    ids=[
        "backend", "q_rank", "k_shape", "v_shape", "v_empty", "log_alpha_shape", "beta_shape", "state_shape", "empty",
        "no_keys", "k_dtype", "beta_dtype", "state_dtype", "int", "device", "numpy", "list", "state_list", "chunk_zero",
        "chunk_float",
    ],
)
def test_bad_input_is_a_clear_value_error(case, message):
    args, kwargs = case
    with pytest.raises(ValueError, match=message):
        kernels.delta_rule(*args, **kwargs)


def test_half_inputs_accept_an_fp32_state_but_not_fp64():
    *inputs, state = _inputs(dtype=torch.bfloat16)
    kernels.delta_rule(*inputs, state.float())
    with pytest.raises(ValueError, match=r"with torch.bfloat16 inputs it must be torch.bfloat16 or torch.float32"):
        kernels.delta_rule(*inputs, state.double())


def test_scan_is_unchanged():
    # kernels.scan is still the scan function, next to the new export.
    assert kernels.scan.__module__ == "kernels.scan" and callable(kernels.delta_rule)


def test_triton_on_cpu_without_interpreter_is_refused():
    # A fresh interpreter without TRITON_INTERPRET, so Triton is imported in compiled mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, kernels\n"
        "x = torch.zeros(1, 1, 2, 16)\n"
        "try:\n"
        "    kernels.delta_rule(x, x, x, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), backend='triton')\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError: delta_rule: backend='triton' needs CUDA tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout
