"""Chunked PyTorch scan: the CPU path (pure torch, so it also runs on GPU as a baseline).

    forward:   h_t = a_t h_{t-1} + x_t,          a_t = exp(log_a_t) in [0, 1]
    backward:  g_t = dL/dh_t + a_{t+1} g_{t+1}   (a reverse-time scan of the same form)
               dx_t = g_t,  dlog_a_t = g_t a_t h_{t-1},  dh0 = a_0 g_0

No Python loop over time steps. Time is cut into chunks of `chunk` steps and the chunks are
visited in order (a loop over T/chunk chunks), carrying the [B, D] state between them. Within
a chunk every step is solved at once by a Hillis-Steele scan over (decay, value) pairs:
log2(chunk) vectorised steps on a [B, chunk, D] block that stays in cache, which is why this
beats both a step-by-step loop (thousands of tiny ops) and a whole-sequence parallel scan
(log2(T) passes over memory).

Stability: decays are products of a_t values in [0, 1], never exp of a positive number, so
log_a anywhere in [-inf, 0] gives no overflow and no NaN. bf16/fp16 inputs are computed in
fp32; fp64 inputs in fp64 (so that gradcheck is meaningful).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 128


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_within_chunk(
    a: torch.Tensor,  # [B, L, D] decays in [0, 1]
    x: torch.Tensor,  # [B, L, D]
    reverse: bool,
    buffers: list[torch.Tensor],  # four [B, >=L, D] scratch tensors, compute dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # value [B, L, D], decay [B, L, D]: views into buffers
    """Scan one chunk from a zero state; also return the running product of decays.

    forward  (reverse=False): value_t = a_t value_{t-1} + x_t,  decay_t = a_0 ... a_t
    reverse  (reverse=True):  value_t = a_t value_{t+1} + x_t,  decay_t = a_t ... a_{L-1}
    Hillis-Steele: after the step with offset o every element holds the composition of the
    2o elements ending at it (in scan order). Each step reads the previous step's values, so
    results alternate between two pairs of buffers.
    """
    length = x.shape[1]
    a_src, x_src = a, x  # the inputs are never written
    offset, pair = 1, 0
    while offset < length:
        a_dst, x_dst = buffers[2 * pair][:, :length], buffers[2 * pair + 1][:, :length]
        if reverse:
            updated, neighbour, untouched = slice(0, length - offset), slice(offset, length), slice(length - offset, length)
        else:
            updated, neighbour, untouched = slice(offset, length), slice(0, length - offset), slice(0, offset)
        # The first `offset` elements in scan order have no neighbour that far back: already final.
        a_dst[:, untouched] = a_src[:, untouched]
        x_dst[:, untouched] = x_src[:, untouched]
        # The neighbour comes first in scan order: value = x + a * x_neighbour, decay = a * a_neighbour.
        torch.addcmul(x_src[:, updated], a_src[:, updated], x_src[:, neighbour], out=x_dst[:, updated])
        torch.mul(a_src[:, updated], a_src[:, neighbour], out=a_dst[:, updated])
        a_src, x_src = a_dst, x_dst
        offset, pair = offset * 2, 1 - pair
    if length == 1:  # callers may write into the result, so never hand back the inputs
        a_src = buffers[0][:, :1].copy_(a)
        x_src = buffers[1][:, :1].copy_(x)
    return x_src, a_src


def _scratch(B: int, chunk: int, D: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(B, chunk, D, dtype=dtype, device=device) for _ in range(4)]


def scan_forward(
    log_a: torch.Tensor,  # [B, T, D]
    x: torch.Tensor,  # [B, T, D]
    h0: torch.Tensor | None,  # [B, D] or None for zeros
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D] in x's dtype, h_last [B, D] compute dtype
    """Forward scan: one pass over the chunks in time order, carrying the state."""
    B, T, D = x.shape
    work = compute_dtype(x.dtype)
    h = torch.full_like(x, float("nan"))  # poisoned: a step the loop missed cannot pass for a result
    buffers = _scratch(B, min(chunk, T), D, work, x.device)
    carry = h0.to(work) if h0 is not None else x.new_zeros(B, D, dtype=work)  # state before the chunk
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        a = log_a[:, start:stop].to(work).exp()  # [B, L, D]
        value, decay = _scan_within_chunk(a, x[:, start:stop].to(work), False, buffers)
        # h = value + decay * carry: the state entering the chunk, decayed to each step.
        torch.addcmul(value, decay, carry[:, None, :], out=h[:, start:stop])
        carry = torch.addcmul(value[:, -1], decay[:, -1], carry)  # kept in compute dtype
    return h, carry


def scan_backward(
    log_a: torch.Tensor,  # [B, T, D]
    h: torch.Tensor,  # [B, T, D] forward output
    h0: torch.Tensor | None,  # [B, D]
    grad_h: torch.Tensor,  # [B, T, D]
    grad_h_last: torch.Tensor,  # [B, D]
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # dlog_a, dx [B, T, D] in log_a's dtype; dh0 [B, D]
    """Backward scan: one pass over the chunks in reverse time order, carrying g."""
    B, T, D = log_a.shape
    work = compute_dtype(log_a.dtype)
    grad_log_a = torch.full_like(log_a, float("nan"))  # poisoned, like the forward's output
    grad_x = torch.full_like(log_a, float("nan"))
    buffers = _scratch(B, min(chunk, T), D, work, log_a.device)
    g_chunk = torch.empty(B, min(chunk, T), D, dtype=work, device=log_a.device)
    first_h_prev = h0.to(work)[:, None, :] if h0 is not None else h.new_zeros(B, 1, D, dtype=work)
    # g_{T-1} = dL/dh_{T-1} + dL/dh_last: h_last's gradient enters as the state "after" the end,
    # carried in by a decay of 1.
    carry = grad_h_last.to(work)  # g just after the chunk
    a_first = None
    for start in reversed(range(0, T, chunk)):
        stop = min(start + chunk, T)
        length = stop - start
        a_ext = log_a[:, start : min(stop + 1, T)].to(work).exp()  # [B, L or L+1, D]
        a = a_ext[:, :length]
        a_next = a_ext[:, 1:]  # a_{t+1}, the decay that carries g_{t+1} into g_t
        if stop == T:
            a_next = torch.cat([a_next, a_ext.new_ones(B, 1, D)], dim=1)
        value, decay = _scan_within_chunk(a_next, grad_h[:, start:stop].to(work), True, buffers)
        g = torch.addcmul(value, decay, carry[:, None, :], out=g_chunk[:, :length])  # [B, L, D]
        carry = g[:, 0].clone()
        grad_x[:, start:stop] = g
        if start == 0:
            h_prev = torch.cat([first_h_prev, h[:, : stop - 1].to(work)], dim=1)
            a_first = a[:, 0]
        else:
            h_prev = h[:, start - 1 : stop - 1].to(work)
        grad_log_a[:, start:stop] = g * a * h_prev
    grad_h0 = (a_first * carry).to(h0.dtype) if h0 is not None else None
    return grad_log_a, grad_x, grad_h0


class ChunkedScanFunction(torch.autograd.Function):
    """Autograd wrapper: forward by `scan_forward`, backward by the hand-written `scan_backward`."""

    @staticmethod
    def forward(ctx, log_a, x, h0, chunk):
        h, h_last = scan_forward(log_a, x, h0, chunk)
        ctx.save_for_backward(log_a, h, h0)
        ctx.chunk = chunk
        return h, h_last.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_h, grad_h_last):
        log_a, h, h0 = ctx.saved_tensors
        grad_log_a, grad_x, grad_h0 = scan_backward(log_a, h, h0, grad_h, grad_h_last, ctx.chunk)
        return grad_log_a, grad_x, grad_h0, None


def scan_cpu(
    log_a: torch.Tensor,  # [B, T, D]
    x: torch.Tensor,  # [B, T, D]
    h0: torch.Tensor | None = None,  # [B, D]
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:  # h [B, T, D], h_last [B, D], both in x's dtype
    """The chunked scan, differentiable in log_a, x and h0. Inputs are validated by `kernels.scan`."""
    return ChunkedScanFunction.apply(log_a, x, h0, chunk)
