"""The Triton kernels compile for a Hopper GPU (sm_90) ahead of time, without a GPU.

The interpreter (test_scan_triton.py) checks what the kernels compute but skips Triton's
compiler, where type errors and unsupported constructs surface. Compiling every kernel variant
to a cubin here catches those on CPU-only machines. It runs in a fresh Python without
TRITON_INTERPRET (kernels are decorated in interpreted mode otherwise) and with an empty
Triton cache, so every variant is really compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

COMPILE_ALL_VARIANTS = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.scan import triton_scan as ts

TARGET = GPUTarget("cuda", 90, 32)
TILE = {"CHUNK": 64, "BLOCK_D": 32}


def compile_variant(kernel, pointer_types, constexprs):
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in kernel.arg_names
    }
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k not in TILE)
    print(f"compiled {kernel.fn.__name__} [{flags}] cubin={len(compiled.asm['cubin'])}")


for inputs, acc, acc_ptr in (("*bf16", tl.float32, "*fp32"), ("*fp64", tl.float64, "*fp64")):
    for backward in (False, True):
        pointers = dict(log_a_ptr=inputs, values_ptr=inputs, grad_h_last_ptr=inputs,
                        chunk_decay_ptr=acc_ptr, chunk_value_ptr=acc_ptr)
        compile_variant(ts._chunk_summary_kernel, pointers, dict(BACKWARD=backward, ACC=acc, **TILE))
    for reverse in (False, True):
        pointers = dict(chunk_decay_ptr=acc_ptr, chunk_value_ptr=acc_ptr, initial_ptr=inputs,
                        carry_in_ptr=acc_ptr, final_ptr=acc_ptr)
        constexprs = dict(HAS_INITIAL=not reverse, REVERSE=reverse, BLOCK_D=32, ACC=acc)
        compile_variant(ts._carry_kernel, pointers, constexprs)
    pointers = dict(log_a_ptr=inputs, x_ptr=inputs, carry_in_ptr=acc_ptr, h_ptr=inputs)
    compile_variant(ts._forward_output_kernel, pointers, dict(ACC=acc, **TILE))
    for has_h0 in (False, True):
        pointers = dict(log_a_ptr=inputs, h_ptr=inputs, h0_ptr=inputs, grad_h_ptr=inputs, grad_h_last_ptr=inputs,
                        carry_in_ptr=acc_ptr, grad_log_a_ptr=inputs, grad_x_ptr=inputs)
        compile_variant(ts._backward_output_kernel, pointers, dict(HAS_H0=has_h0, ACC=acc, **TILE))
"""


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL_VARIANTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"compilation failed:\n{result.stderr[-4000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("compiled ")]
    # Per dtype: 2 chunk-summary, 2 carry, 1 forward-output and 2 backward-output variants.
    assert len(lines) == 14, result.stdout
    for line in lines:
        cubin_bytes = int(line.rsplit("cubin=", 1)[1])
        assert cubin_bytes > 1000, f"suspiciously small cubin: {line}"
