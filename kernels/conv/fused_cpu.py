"""Causal depthwise convolution + SiLU as one C kernel for fp32 CPU tensors (short_conv.c).

The C source is compiled on first use with the system's C compiler ($CC, else cc, gcc or g++) into
$MMREC_CACHE_DIR/kernels (default ~/.cache/mmrec/kernels), keyed by the source, the flags and the
CPU's feature flags (-march=native code built on one CPU model may not run on another), and loaded
with ctypes: no torch headers, so a build takes under a second. The build is written to a
temporary name and renamed into place, so processes starting together (Ray workers) never load a
half-written library. `available()` says whether it could be built, and why not.

Forward and backward each make one pass over the rows (the torch version, `shifted.py`, about
25); the backward recomputes the pre-activation instead of saving it. Threads: the kernel splits
channels over torch.get_num_threads() POSIX threads.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("short_conv.c")
FLAGS = ("-x", "c", "-O3", "-march=native", "-std=c11", "-shared", "-fPIC", "-pthread")  # -x c: g++ will do too
MAX_TAPS = 16  # as in short_conv.c


def _cache_dir() -> Path:
    return Path(os.environ.get("MMREC_CACHE_DIR", Path.home() / ".cache" / "mmrec")) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


class BuildError(RuntimeError):
    pass


def _build() -> ctypes.CDLL:
    wanted = os.environ.get("CC")
    compiler = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, ("cc", "gcc", "g++"))), None)
    if not compiler:
        looked = f"$CC={wanted!r} is not an executable" if wanted else "no cc, gcc or g++ on PATH"
        raise BuildError(f"no C compiler ({looked}); install one (Debian: apt install gcc) or set CC")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"short_conv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise BuildError(f"{compiler} failed on {SOURCE} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        log.info("built the fused short-conv CPU kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.short_conv_silu_forward.argtypes = [i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.short_conv_silu_backward.argtypes = [i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.short_conv_silu_forward.restype = lib.short_conv_silu_backward.restype = ctypes.c_int
    return lib


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    try:
        return _build(), ""
    except (BuildError, OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)


def available() -> tuple[bool, str]:
    """(True, "") when the kernel is built and loaded, else (False, why not)."""
    lib, why = _library()
    return lib is not None, why


def supports(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None) -> bool:
    """Whether these tensors can take the C path: fp32, CPU, channels contiguous, K <= MAX_TAPS."""
    tensors = [x, weight] + ([tail] if tail is not None else [])
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and x.stride(-1) == 1 and 1 <= weight.shape[1] <= MAX_TAPS)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"short_conv C kernel: {what} failed (status {status}: "
                           f"{'taps out of range' if status == -1 else 'out of memory'})")


def forward_into(x: torch.Tensor, weight_kc: torch.Tensor, tail: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [B, T, C] (contiguous) = silu(conv(x)); x [B, T, C] with unit channel stride, weight_kc [K, C]
    contiguous, tail [B, K-1, C] contiguous or None."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"short_conv C kernel unavailable: {why}")
    B, T, C = x.shape
    status = lib.short_conv_silu_forward(B, T, C, weight_kc.shape[0], x.data_ptr(), x.stride(0), x.stride(1),
                                         _pointer(tail), weight_kc.data_ptr(), out.data_ptr(), torch.get_num_threads())
    _check(status, "forward")


def backward_into(x, weight_kc, tail, grad_y, grad_x, grad_tail, grad_weight_kc) -> None:
    """grad_x [B, T, C], grad_tail [B, K-1, C] (or None), grad_weight_kc [K, C]: all contiguous, all written."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"short_conv C kernel unavailable: {why}")
    B, T, C = x.shape
    status = lib.short_conv_silu_backward(
        B, T, C, weight_kc.shape[0], x.data_ptr(), x.stride(0), x.stride(1), _pointer(tail), weight_kc.data_ptr(),
        grad_y.data_ptr(), grad_x.data_ptr(), _pointer(grad_tail), grad_weight_kc.data_ptr(), torch.get_num_threads())
    _check(status, "backward")


class ShortConvSiluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tail):  # x [B, T, C], weight [C, K], tail [B, K-1, C] or None -> y [B, T, C]
        weight_kc = weight.detach().t().contiguous()
        tail = tail.contiguous() if tail is not None else None
        out = torch.empty(x.shape, dtype=x.dtype)
        forward_into(x, weight_kc, tail, out)
        ctx.save_for_backward(x, weight_kc, tail)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight_kc, tail = ctx.saved_tensors
        grad_x = torch.empty(x.shape, dtype=x.dtype)
        grad_tail = torch.empty(tail.shape, dtype=x.dtype) if tail is not None and ctx.needs_input_grad[2] else None
        grad_weight_kc = torch.empty_like(weight_kc)
        backward_into(x, weight_kc, tail, grad_y.contiguous(), grad_x, grad_tail, grad_weight_kc)
        return grad_x, grad_weight_kc.t(), grad_tail


def short_conv_fused_cpu(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) of x [B, T, C] with weight [C, K] after tail [B, K-1, C] (None: zeros)."""
    return ShortConvSiluFunction.apply(x, weight, tail)
