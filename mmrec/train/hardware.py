"""What the hardware can do: native bf16, and the peak matmul FLOP/s that MFU is measured against.

On CPUs the peak is measured, not assumed: a short GEMM in the dtype in use, the best of a few
0.1 s windows, once per (CPU model, threads, dtype) and day, cached in ~/.cache/mmrec/peak_flops.json. On GPUs it comes from a
table of dense tensor-core peaks (overridable with metrics.peak_flops), else it is measured too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from core import storage

log = logging.getLogger(__name__)

# Dense (no sparsity) tensor-core peaks, FLOP/s, from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},  # SXM; the PCIe card is lower, measured if the name says PCIe
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
}
CACHE_MAX_AGE_S = 24 * 3600  # re-measured daily: a machine's load when it was measured should not stick
_CACHE = Path(os.environ.get("MMREC_CACHE_DIR", Path.home() / ".cache" / "mmrec")) / "peak_flops.json"


# glibc's mallopt parameters (malloc.h)
_M_MXFAST, _M_TRIM_THRESHOLD, _M_MMAP_MAX = 1, -1, -4
# Read by glibc when a process starts; see keep_freed_memory.
TCACHE_OFF = "glibc.malloc.tcache_count=0"


def _tcache_off(environ) -> bool:
    """Whether a process started with `environ` runs glibc with its per-thread cache off."""
    return TCACHE_OFF in environ.get("GLIBC_TUNABLES", "").split(":")


def _started_with_tcache_off() -> bool:
    """_tcache_off() of the environment this process started with, which is what glibc read (Linux keeps
    it in /proc/self/environ; GLIBC_TUNABLES set in os.environ later changes nothing)."""
    try:
        entries = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    initial = dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)
    return _tcache_off(initial)


def allocator_env(environ=os.environ) -> dict[str, str]:
    """GLIBC_TUNABLES for a process about to start (Ray Train workers, benchmark cells): the tunables
    already set, plus glibc's per-thread cache off (see keep_freed_memory)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if _tcache_off(environ):
        return {"GLIBC_TUNABLES": current}
    return {"GLIBC_TUNABLES": f"{current}:{TCACHE_OFF}" if current else TCACHE_OFF}


def keep_freed_memory() -> str:
    """Keep freed memory in the process for reuse; returns a line saying what was done.

    glibc serves each allocation over its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, so every large activation of a long sequence is zero-filled by the kernel page
    by page again on the next step: at T = 32K, `small` took 26.8M minor page faults per training step
    (about 100 GB of zeroed pages) and ran at 0.74x the speed it has with this. Serving everything
    from the heap (mallopt M_MMAP_MAX = 0) keeps those pages in the process.

    That alone does not make the heap reuse them: torch asks for 64-byte-aligned blocks
    (posix_memalign), glibc (2.36) carves each from a larger chunk and frees the few bytes of slack
    before and after it into its per-thread cache (tcache) or a fastbin, where they never coalesce,
    so the hole a freed block leaves is too small for the next request of the same size, which then
    takes fresh pages. With fastbins off (M_MXFAST = 0, set here) and the tcache off (only settable
    when the process starts: GLIBC_TUNABLES, see allocator_env; Ray Train workers get it) the slack
    coalesces and the same block is reused, so nothing is ever trimmed (M_TRIM_THRESHOLD = -1): the
    resident size stays at the step's peak, which a training process reaches on every step anyway.
    With the tcache on, trimming starts above 2 GiB of free heap, which bounds the growth the
    unreusable holes cause at the price of faulting those pages in again.
    Not glibc (musl, macOS): nothing is changed.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"CPU allocator left as it is ({name or 'no C library found'} has no mallopt)"
    reuse = _started_with_tcache_off()
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_MXFAST, 0) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, -1 if reuse else 2**31 - 1) != 1:
        return "CPU allocator left as it is (mallopt refused)"
    if reuse:
        return "CPU allocator keeps freed memory and reuses large blocks (no mmap per tensor, glibc tcache off, no trimming)"
    return ("CPU allocator keeps freed memory (no mmap per tensor, trimming above 2 GiB); large blocks are reused "
            f"across steps only in a process started with GLIBC_TUNABLES={TCACHE_OFF}, as Ray Train workers are")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BF16_MIN_GAIN = 1.25  # a CPU's bf16 GEMM must beat its fp32 GEMM by this much before auto picks bf16


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(bf16 matmuls pay here, why): CUDA with bf16 support; on a CPU, the bf16 flags AND a measured gain.

    The flags alone decide nothing: a CPU with AVX512-BF16 but no AMX (the project's VM on some days)
    runs a bf16 GEMM at about half its fp32 rate, so training in bf16 there is slower. The two GEMM
    rates are the ones MFU is measured against (peak_flops: measured once a day, cached).
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    found = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    if not found:
        return False, "the CPU has neither AMX nor AVX512-BF16, where bf16 would be emulated and slower than fp32"
    bf16, _ = peak_flops(device, torch.bfloat16)
    fp32, _ = peak_flops(device, None)
    return bf16_pays(found, bf16, fp32)


def bf16_pays(flags: list[str], bf16_flops: float, fp32_flops: float) -> tuple[bool, str]:
    """The CPU rule of native_bf16 on given flags and measured GEMM rates (FLOP/s)."""
    figures = (f"the CPU has {' and '.join(flags)}; a bf16 GEMM runs at {bf16_flops / 1e9:,.0f} GFLOP/s "
               f"against {fp32_flops / 1e9:,.0f} in fp32")
    if bf16_flops >= BF16_MIN_GAIN * fp32_flops:
        return True, figures
    return False, f"{figures}, under {BF16_MIN_GAIN}x: bf16 would not be faster here"


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, a line saying why) for train.precision auto / fp32 / bf16."""
    if precision == "fp32":
        return None, "fp32 (train.precision=fp32)"
    ok, why = native_bf16(device)
    if precision == "bf16":
        return torch.bfloat16, f"bf16 autocast (train.precision=bf16; {why})"
    if ok:
        return torch.bfloat16, f"bf16 autocast with fp32 weights and accumulation ({why})"
    return None, f"fp32: {why} (train.precision=auto)"


def _gemm_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, windows: int = 5,
                window_s: float = 0.1) -> float:
    """The best of a few short timed windows of size x size matmuls (the best resists a busy neighbour)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = 0.0
    for _ in range(windows):
        runs, started = 0, time.perf_counter()
        while True:
            a @ b
            runs += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed > window_s:
                break
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> tuple[float, str]:
    """(peak FLOP/s of one worker's device for matmuls in `dtype` (None: fp32), where the figure came from)."""
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name and "PCIe" not in name:
                return peaks[kind], f"device table ({key} {kind})"
    key = f"{device.type}|{cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}|" \
          f"{torch.get_num_threads()} threads|{kind}"
    try:
        cache = json.loads(_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if not isinstance(entry, dict) or time.time() - entry.get("measured_at", 0) > CACHE_MAX_AGE_S:
        entry = cache[key] = {"flops": _gemm_flops(dtype or torch.float32, device), "measured_at": time.time()}
        try:
            storage.write_text(str(_CACHE), json.dumps(cache, indent=1))
        except (OSError, storage.StorageError) as error:  # a read-only home only costs the next run another measurement
            log.warning("could not cache the measured peak in %s: %s", _CACHE, error)
    return entry["flops"], f"measured {kind} GEMM ({key})"
