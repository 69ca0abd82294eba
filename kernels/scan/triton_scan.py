"""Chunked Triton scan, forward and backward: the path for CUDA tensors.

    forward:   h_t = a_t h_{t-1} + x_t,          a_t = exp(log_a_t)
    backward:  g_t = dL/dh_t + a_{t+1} g_{t+1},  dx_t = g_t,  dlog_a_t = g_t a_t h_{t-1},  dh0 = a_0 g_0

Both directions run the same three passes over tiles of [CHUNK time steps, BLOCK_D channels],
so B * (T / CHUNK) * (D / BLOCK_D) programs fill the GPU even at B = 8, D = 256:

    pass 1  per tile: `tl.associative_scan` over (decay, value) pairs from a zero state; keep
            only the chunk's total decay and end value                     -> [B, N, D] each
    pass 2  per (b, channel block): walk the N chunk summaries in order, carrying the state;
            record the state entering every chunk                          -> [B, N, D]
    pass 3  per tile: fold the entering state into the first step, scan again, write outputs

Pass 3 recomputes the scan instead of storing pass 1's result: reading inputs twice is cheaper
than writing and re-reading an fp32 intermediate. The backward is a reverse-time scan; it loads
each chunk with its rows in reversed time order and scans forward over rows, because
`associative_scan(reverse=True)` with a non-commutative combine is wrong on GPU (triton#4362).
Accumulation is fp32 (fp64 for fp64 inputs) whatever the input dtype. Outputs are allocated
full of NaN, so a tile a kernel forgot to write cannot pass for a result.

Under TRITON_INTERPRET=1 (set before Triton is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at import (kernel decoration) time whether kernels are interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEFAULT_CHUNK = 64
DEFAULT_BLOCK_D = 32


@triton.jit
def _combine(decay_first, value_first, decay_second, value_second):
    # Apply `first` then `second` to a state h: decay_second * (decay_first * h + value_first) + value_second
    return decay_first * decay_second, decay_second * value_first + value_second


@triton.jit
def _tile(pid, T, D, N, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, REVERSED_ROWS: tl.constexpr):
    """Which (batch, chunk, channel block) program `pid` owns; rows map to time steps."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    dblock = pid % n_dblocks
    chunk_id = (pid // n_dblocks) % N
    b = pid // (n_dblocks * N)
    rows = tl.arange(0, CHUNK)
    if REVERSED_ROWS:  # row 0 is the chunk's last time step: a reverse-time scan runs over rows
        t = chunk_id * CHUNK + (CHUNK - 1 - rows)
    else:
        t = chunk_id * CHUNK + rows
    d = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    offsets = b.to(tl.int64) * T * D + t.to(tl.int64)[:, None] * D + d[None, :]  # [CHUNK, BLOCK_D]
    mask = (t < T)[:, None] & (d < D)[None, :]
    summary_offsets = (b.to(tl.int64) * N + chunk_id) * D + d  # [BLOCK_D] into [B, N, D]
    return b, t, d, offsets, mask, summary_offsets


@triton.jit
def _last_row(tile, CHUNK: tl.constexpr):
    """tile[CHUNK - 1, :] as a [BLOCK_D] vector (tensors cannot be indexed by row in Triton)."""
    rows = tl.arange(0, CHUNK)[:, None]
    return tl.sum(tl.where(rows == CHUNK - 1, tile, 0.0), axis=0)


@triton.jit
def _forward_pairs(log_a_ptr, x_ptr, offsets, mask, ACC: tl.constexpr):
    # Padded steps get decay 1 and value 0: they pass the state through unchanged.
    decay = tl.exp(tl.load(log_a_ptr + offsets, mask=mask, other=0.0).to(ACC))
    value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    return decay, value


@triton.jit
def _backward_pairs(log_a_ptr, grad_h_ptr, grad_h_last_ptr, b, t, d, offsets, mask, T, D, ACC: tl.constexpr):
    # g_t = a_{t+1} g_{t+1} + dL/dh_t; at t = T-1 the gradient of h_last joins dL/dh_t. Steps
    # past the end have decay 1 and value 0, like the forward's padding.
    next_mask = (t + 1 < T)[:, None] & (d < D)[None, :]
    decay = tl.exp(tl.load(log_a_ptr + offsets + D, mask=next_mask, other=0.0).to(ACC))
    value = tl.load(grad_h_ptr + offsets, mask=mask, other=0.0).to(ACC)
    grad_last = tl.load(grad_h_last_ptr + b.to(tl.int64) * D + d, mask=d < D, other=0.0).to(ACC)
    value += tl.where((t == T - 1)[:, None], grad_last[None, :], 0.0)
    return decay, value


@triton.jit
def _chunk_summary_kernel(
    log_a_ptr, values_ptr, grad_h_last_ptr,  # [B, T, D], [B, T, D] (x or dL/dh), [B, D] (backward only)
    chunk_decay_ptr, chunk_value_ptr,  # [B, N, D] out: per-chunk total decay and end value
    T, D, N,
    BACKWARD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 1: scan each chunk from a zero state and keep only its end (decay, value)."""
    b, t, d, offsets, mask, summary_offsets = _tile(tl.program_id(0), T, D, N, CHUNK, BLOCK_D, BACKWARD)
    if BACKWARD:
        decay, value = _backward_pairs(log_a_ptr, values_ptr, grad_h_last_ptr, b, t, d, offsets, mask, T, D, ACC)
    else:
        decay, value = _forward_pairs(log_a_ptr, values_ptr, offsets, mask, ACC)
    decay, value = tl.associative_scan((decay, value), axis=0, combine_fn=_combine)  # [CHUNK, BLOCK_D]
    tl.store(chunk_decay_ptr + summary_offsets, _last_row(decay, CHUNK), mask=d < D)
    tl.store(chunk_value_ptr + summary_offsets, _last_row(value, CHUNK), mask=d < D)


@triton.jit
def _carry_kernel(
    chunk_decay_ptr, chunk_value_ptr,  # [B, N, D] from pass 1
    initial_ptr,  # [B, D] state before the first chunk in scan order (read only if HAS_INITIAL)
    carry_in_ptr,  # [B, N, D] out: state entering each chunk
    final_ptr,  # [B, D] out: state after the last chunk in scan order
    N, D,
    HAS_INITIAL: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 2: a sequential walk over the N chunk summaries of one (b, channel block)."""
    pid = tl.program_id(0)
    n_dblocks = tl.cdiv(D, BLOCK_D)
    b = (pid // n_dblocks).to(tl.int64)
    d = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    if HAS_INITIAL:
        carry = tl.load(initial_ptr + b * D + d, mask=d_mask, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(0, N):
        if REVERSE:
            n = N - 1 - i
        else:
            n = i
        offsets = (b * N + n) * D + d
        tl.store(carry_in_ptr + offsets, carry, mask=d_mask)
        decay = tl.load(chunk_decay_ptr + offsets, mask=d_mask, other=0.0)
        value = tl.load(chunk_value_ptr + offsets, mask=d_mask, other=0.0)
        carry = decay * carry + value
    tl.store(final_ptr + b * D + d, carry, mask=d_mask)


@triton.jit
def _forward_output_kernel(
    log_a_ptr, x_ptr, carry_in_ptr,  # [B, T, D], [B, T, D], [B, N, D]
    h_ptr,  # [B, T, D] out, x's dtype
    T, D, N,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 3 (forward): h over one tile, starting from the state that enters the chunk."""
    b, t, d, offsets, mask, summary_offsets = _tile(tl.program_id(0), T, D, N, CHUNK, BLOCK_D, False)
    decay, value = _forward_pairs(log_a_ptr, x_ptr, offsets, mask, ACC)
    carry = tl.load(carry_in_ptr + summary_offsets, mask=d < D, other=0.0)  # [BLOCK_D]
    # Folding the entering state into the first step's value makes the scan start from it.
    first_row = (tl.arange(0, CHUNK) == 0)[:, None]
    value += tl.where(first_row, decay * carry[None, :], 0.0)
    decay, h = tl.associative_scan((decay, value), axis=0, combine_fn=_combine)
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_output_kernel(
    log_a_ptr, h_ptr, h0_ptr, grad_h_ptr, grad_h_last_ptr,  # [B, T, D] x3 with h0 [B, D], dL/dh_last [B, D]
    carry_in_ptr,  # [B, N, D]: g just after each chunk
    grad_log_a_ptr, grad_x_ptr,  # [B, T, D] out
    T, D, N,
    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 3 (backward): g over one tile (rows in reversed time), then dx = g, dlog_a = g a h_prev."""
    b, t, d, offsets, mask, summary_offsets = _tile(tl.program_id(0), T, D, N, CHUNK, BLOCK_D, True)
    decay, value = _backward_pairs(log_a_ptr, grad_h_ptr, grad_h_last_ptr, b, t, d, offsets, mask, T, D, ACC)
    carry = tl.load(carry_in_ptr + summary_offsets, mask=d < D, other=0.0)
    first_row = (tl.arange(0, CHUNK) == 0)[:, None]
    value += tl.where(first_row, decay * carry[None, :], 0.0)
    decay, g = tl.associative_scan((decay, value), axis=0, combine_fn=_combine)  # g [CHUNK, BLOCK_D]
    tl.store(grad_x_ptr + offsets, g.to(grad_x_ptr.dtype.element_ty), mask=mask)

    a = tl.exp(tl.load(log_a_ptr + offsets, mask=mask, other=0.0).to(ACC))
    h_prev = tl.load(h_ptr + offsets - D, mask=mask & (t >= 1)[:, None], other=0.0).to(ACC)
    if HAS_H0:
        h0 = tl.load(h0_ptr + b.to(tl.int64) * D + d, mask=d < D, other=0.0).to(ACC)
        h_prev = tl.where((t == 0)[:, None], h0[None, :], h_prev)
    tl.store(grad_log_a_ptr + offsets, (g * a * h_prev).to(grad_log_a_ptr.dtype.element_ty), mask=mask)


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _nan(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def _carry_pass(chunk_decay, chunk_value, initial, block_d, reverse, acc_tl):
    """Launch pass 2; returns (carry_in [B, N, D], final [B, D]) in the accumulation dtype."""
    B, N, D = chunk_decay.shape
    carry_in = _nan((B, N, D), chunk_decay)
    final = _nan((B, D), chunk_decay)
    _carry_kernel[(B * triton.cdiv(D, block_d),)](
        chunk_decay, chunk_value, initial if initial is not None else chunk_decay, carry_in, final, N, D,
        HAS_INITIAL=initial is not None, REVERSE=reverse, BLOCK_D=block_d, ACC=acc_tl,
    )
    return carry_in, final


def scan_forward(
    log_a: torch.Tensor,  # [B, T, D] contiguous
    x: torch.Tensor,  # [B, T, D] contiguous
    h0: torch.Tensor | None,  # [B, D] contiguous
    chunk: int = DEFAULT_CHUNK,
    block_d: int = DEFAULT_BLOCK_D,
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D] in x's dtype, h_last [B, D] in x's dtype
    B, T, D = x.shape
    n_chunks = triton.cdiv(T, chunk)
    acc, acc_tl = _accumulation(x.dtype)
    grid = (B * n_chunks * triton.cdiv(D, block_d),)
    chunk_decay = _nan((B, n_chunks, D), x, acc)
    chunk_value = _nan((B, n_chunks, D), x, acc)
    _chunk_summary_kernel[grid](
        log_a, x, x, chunk_decay, chunk_value, T, D, n_chunks,
        BACKWARD=False, CHUNK=chunk, BLOCK_D=block_d, ACC=acc_tl,
    )
    carry_in, h_last = _carry_pass(chunk_decay, chunk_value, h0, block_d, False, acc_tl)
    h = _nan((B, T, D), x)
    _forward_output_kernel[grid](log_a, x, carry_in, h, T, D, n_chunks, CHUNK=chunk, BLOCK_D=block_d, ACC=acc_tl)
    return h, h_last.to(x.dtype)


def scan_backward(
    log_a: torch.Tensor,  # [B, T, D] contiguous
    h: torch.Tensor,  # [B, T, D] forward output, contiguous
    h0: torch.Tensor | None,  # [B, D] contiguous
    grad_h: torch.Tensor,  # [B, T, D] contiguous
    grad_h_last: torch.Tensor,  # [B, D] contiguous
    chunk: int = DEFAULT_CHUNK,
    block_d: int = DEFAULT_BLOCK_D,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # dlog_a, dx [B, T, D]; dh0 [B, D]
    B, T, D = log_a.shape
    n_chunks = triton.cdiv(T, chunk)
    acc, acc_tl = _accumulation(log_a.dtype)
    grid = (B * n_chunks * triton.cdiv(D, block_d),)
    chunk_decay = _nan((B, n_chunks, D), log_a, acc)
    chunk_value = _nan((B, n_chunks, D), log_a, acc)
    _chunk_summary_kernel[grid](
        log_a, grad_h, grad_h_last, chunk_decay, chunk_value, T, D, n_chunks,
        BACKWARD=True, CHUNK=chunk, BLOCK_D=block_d, ACC=acc_tl,
    )
    # Walking chunks from last to first; what is left at the end is g_0.
    carry_in, g_first = _carry_pass(chunk_decay, chunk_value, None, block_d, True, acc_tl)
    grad_log_a = _nan((B, T, D), log_a)
    grad_x = _nan((B, T, D), log_a)
    _backward_output_kernel[grid](
        log_a, h, h0 if h0 is not None else h, grad_h, grad_h_last, carry_in, grad_log_a, grad_x, T, D, n_chunks,
        HAS_H0=h0 is not None, CHUNK=chunk, BLOCK_D=block_d, ACC=acc_tl,
    )
    grad_h0 = None
    if h0 is not None:
        grad_h0 = (log_a[:, 0].to(acc).exp() * g_first).to(h0.dtype)  # dh0 = a_0 g_0
    return grad_log_a, grad_x, grad_h0


class TritonScanFunction(torch.autograd.Function):
    """Autograd wrapper around the forward and backward launchers."""

    @staticmethod
    def forward(ctx, log_a, x, h0, chunk, block_d):
        h, h_last = scan_forward(log_a, x, h0, chunk, block_d)
        ctx.save_for_backward(log_a, h, h0)
        ctx.chunk, ctx.block_d = chunk, block_d
        return h, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_h, grad_h_last):
        log_a, h, h0 = ctx.saved_tensors
        grad_log_a, grad_x, grad_h0 = scan_backward(
            log_a, h, h0, grad_h.contiguous(), grad_h_last.contiguous(), ctx.chunk, ctx.block_d
        )
        return grad_log_a, grad_x, grad_h0, None, None


def scan_triton(
    log_a: torch.Tensor,  # [B, T, D] contiguous
    x: torch.Tensor,  # [B, T, D] contiguous
    h0: torch.Tensor | None = None,  # [B, D] contiguous
    chunk: int = DEFAULT_CHUNK,
    block_d: int = DEFAULT_BLOCK_D,
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D], h_last [B, D] in x's dtype
    """The Triton scan, differentiable in log_a, x and h0. Inputs are validated by `kernels.scan`.

    chunk and block_d must be powers of two (Triton block shapes); tests shrink them to cover
    several chunks and channel blocks at small shapes.
    """
    for name, value in (("chunk", chunk), ("block_d", block_d)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"scan_triton: {name} must be a power of two, got {value}")
    return TritonScanFunction.apply(log_a, x, h0, chunk, block_d)
