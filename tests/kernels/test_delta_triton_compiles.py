"""The delta-rule Triton kernels compile for a Hopper GPU (sm_90) ahead of time, without a GPU.

The interpreter (test_delta_triton.py) checks what the kernels compute but skips Triton's
compiler, where type errors, unsupported constructs and oversized tiles surface. Compiling to a
cubin here catches those on CPU-only machines. It runs in a fresh Python without
TRITON_INTERPRET (kernels are decorated in interpreted mode otherwise) and with an empty Triton
cache, so every variant is really compiled.

The fast test compiles every dtype's forward and backward at 16-wide tiles (seconds each). The
slow test compiles the tiles the model runs (chunk 64, Dk = Dv = 64; tens of seconds each) and
checks they fit the shared memory of one H100/H200 block.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (H100, H200): 227 KiB.
SM90_SHARED_MEMORY_BYTES = 232448

COMPILE = r"""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.delta import triton_delta as td

TARGET = GPUTarget("cuda", 90, 32)
CHUNK, BLOCK_K = int(sys.argv[1]), int(sys.argv[2])
DTYPES = {  # inputs, accumulation, accumulation pointers, dot precision, value block (as td._tiles picks)
    "bf16": ("*bf16", tl.float32, "*fp32", "tf32", int(sys.argv[3])),
    "fp32": ("*fp32", tl.float32, "*fp32", "tf32x3", int(sys.argv[3])),
    "fp64": ("*fp64", tl.float64, "*fp64", "ieee", min(32, int(sys.argv[3]))),
}


def compile_variant(kernel, pointer_types, constexprs, num_warps):
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in kernel.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET, options={"num_warps": num_warps}
    )
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k in ("HAS_INITIAL", "DOT_PRECISION", "BLOCK_V"))
    print(f"compiled {kernel.fn.__name__} [{flags}] cubin={len(compiled.asm['cubin'])} shared={compiled.metadata.shared}")


for name, has_initial in (variant.split(":") for variant in sys.argv[4].split(",")):
    inputs, acc, acc_ptr, precision, block_v = DTYPES[name]
    constexprs = dict(
        HAS_INITIAL=has_initial == "1", CHUNK=CHUNK, BLOCK_K=BLOCK_K, BLOCK_V=block_v, ACC=acc, DOT_PRECISION=precision
    )
    inputs_ = dict(q_ptr=inputs, k_ptr=inputs, v_ptr=inputs, log_alpha_ptr=inputs, beta_ptr=inputs)
    pointers = inputs_ | dict(initial_ptr=acc_ptr, o_ptr=inputs, states_ptr=acc_ptr, final_ptr=acc_ptr)
    compile_variant(td._forward_kernel, pointers, constexprs, num_warps=4)
    pointers = inputs_ | dict(
        states_ptr=acc_ptr, grad_o_ptr=inputs, grad_final_ptr=acc_ptr, dq_ptr=acc_ptr, dk_ptr=acc_ptr,
        dlog_alpha_ptr=acc_ptr, dbeta_ptr=acc_ptr, dv_ptr=inputs, d_initial_ptr=acc_ptr,
    )
    compile_variant(td._backward_kernel, pointers, constexprs, num_warps=8)
"""


def _compile(tmp_path, chunk: int, block_k: int, block_v: int, dtypes: tuple[str, ...], timeout: int) -> list[str]:
    """Compile each dtype's kernels in its own fresh process and Triton cache, all side by side (one
    compilation uses one core); dtypes alternate with and without an initial state."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences Triton 3.9's warning
    procs = []
    for i, name in enumerate(dtypes):
        variant = f"{name}:{int(i % 2 == 0)}"
        procs.append(subprocess.Popen(
            [sys.executable, "-c", COMPILE, str(chunk), str(block_k), str(block_v), variant], cwd=REPO,
            env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"triton-cache-{name}")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    lines = []
    try:
        for name, proc in zip(dtypes, procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"compilation of the {name} kernels failed:\n{err[-4000:]}"
            compiled = [line for line in out.splitlines() if line.startswith("compiled ")]
            assert len(compiled) == 2, out
            lines += compiled
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for line in lines:
        cubin_bytes = int(line.split("cubin=", 1)[1].split()[0])
        assert cubin_bytes > 1000, f"suspiciously small cubin: {line}"
    return lines


def test_every_dtype_compiles_for_sm90(tmp_path):
    _compile(tmp_path, chunk=16, block_k=16, block_v=16, dtypes=("bf16", "fp32", "fp64"), timeout=300)


@pytest.mark.slow
def test_model_tiles_compile_and_fit_in_shared_memory(tmp_path):
    # chunk 64, Dk = Dv = 64: what the model runs (fp64 uses 32-column value blocks).
    for line in _compile(tmp_path, chunk=64, block_k=64, block_v=64, dtypes=("bf16", "fp32", "fp64"), timeout=900):
        shared = int(line.split("shared=", 1)[1])
        assert shared <= SM90_SHARED_MEMORY_BYTES, f"needs more shared memory than an sm_90 block has: {line}"
