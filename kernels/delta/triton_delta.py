"""Chunked Triton gated delta rule, forward and backward: the path for CUDA tensors.

The same chunk algorithm as chunk.py (read its docstring for the math), with the state kept
transposed, H = S^T of shape [Dk, Dv]. Per chunk of C steps, everything is tl.dot on tiles:

    A  = diag(beta) (D * K K^T) (strictly lower)      T = (I + A)^{-1}  (forward substitution, C rows)
    U~ = T diag(beta) V     W = T diag(beta gamma) K   U = U~ - W H
    O  = diag(gamma) Q H + (D * Q K^T) U              H' = gamma_last H + (diag(exp(g_last - g)) K)^T U

Grid: one program per (batch * head, block of BLOCK_V value columns). Every term above is
separable in the value columns, so a program owns H[:, its columns] and walks the T/C chunks in
order, carrying its block of the state in registers (fp32; fp64 for fp64 inputs):

    forward   writes o, the state entering every chunk ([B, H, N, Dk, Dv], kept for the
              backward, like chunk.py) and the final state
    backward  walks the chunks in reverse, carrying dH, recomputing each chunk's intra-chunk
              terms from q, k, v, log_alpha, beta and the saved entering state. Gradients that
              sum over value columns (dq, dk, dbeta, dlog_alpha) are written per value block
              into partials [NV, ...] (accumulation dtype) summed by torch afterwards; dv and d initial_state
              belong to one block and are written directly.

Decays: g = cumsum(log_alpha) inside the chunk is accumulated in fp64 and only differences
g_t - g_s <= 0 (s <= t), g_t and g_last - g_t are exponentiated, as in chunk.py, so log_alpha
= -20 per step underflows to 0 and never overflows. dlog_alpha is summed window by window (no
cancellation of O(1) terms, see chunk.py), the exclusive cumsum over pairs as a tl.dot with a
strictly-upper mask. Ragged chunks: loads past T read q = k = v = 0, beta = 0, log_alpha = 0
(steps that pass the state through) and stores are masked.

Tile constraints: tl.dot needs every dimension >= 16. CHUNK and the key/value tiles are powers
of two >= 16; Dk and Dv of any size are padded up to the tile with masked loads (zero keys and
values change nothing), so only chunk_size is constrained: a power of two >= 16, validated with
a clear message.

Dot precision: bf16/fp16 inputs use TF32 tensor-core dots (10 mantissa bits, more than bf16's 8)
and fp32 inputs 3xTF32 (split-precision, about as accurate as fp32), both accumulating in fp32;
IEEE fp32 dots compile to FMA loops (2 and 4 minutes to compile the forward and backward, 2 MB
cubins). fp64 inputs use fp64 dots with value blocks of 32 columns. Shared memory at chunk 64,
Dk = Dv = 64 (compiled for sm_90): backward 160 KiB (bf16, fp32) and 177 KiB (fp64), under the
227 KiB of an H100/H200 block. A larger Dk (the whole key width is one tile) may need chunk_size
32; Triton reports "out of resource: shared memory" if so.

Outputs are allocated full of NaN, so a tile a kernel forgot to write cannot pass for a result.
Under TRITON_INTERPRET=1 (set before Triton is imported) the kernels run on CPU tensors. Status:
checked under the interpreter and by compiling for sm_90; not yet run on a GPU
(tests/kernels/test_delta_cuda.py is ready for one).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at import (kernel decoration) time whether kernels are interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEFAULT_CHUNK = 64
MAX_BLOCK_V = {torch.float64: 32}  # value columns per program (default 64; fewer, padded to 16, when Dv is smaller)


@triton.jit
def _chunk_intra(
    q_ptr, k_ptr, v_ptr, log_alpha_ptr, beta_ptr,  # [B*H, T, *] bases already offset to this (b, h)
    chunk_start, T, Dk, Dv, v_cols,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Load one chunk and compute everything in it that does not depend on the entering state."""
    rows = tl.arange(0, CHUNK)
    t = chunk_start + rows
    t_ok = t < T
    dk = tl.arange(0, BLOCK_K)
    k_mask = t_ok[:, None] & (dk < Dk)[None, :]
    v_mask = t_ok[:, None] & (v_cols < Dv)[None, :]
    q = tl.load(q_ptr + t[:, None] * Dk + dk[None, :], mask=k_mask, other=0.0).to(ACC)  # [C, BK]
    k = tl.load(k_ptr + t[:, None] * Dk + dk[None, :], mask=k_mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + t[:, None] * Dv + v_cols[None, :], mask=v_mask, other=0.0).to(ACC)  # [C, BV]
    beta = tl.load(beta_ptr + t, mask=t_ok, other=0.0).to(ACC)  # [C]
    log_alpha = tl.load(log_alpha_ptr + t, mask=t_ok, other=0.0).to(tl.float64)
    g = tl.cumsum(log_alpha, axis=0)  # fp64: see chunk.py (g reaches -20 C under strong decay)
    g_last = tl.sum(tl.where(rows == CHUNK - 1, g, 0.0), axis=0)
    causal = rows[:, None] >= rows[None, :]
    diff = (g[:, None] - g[None, :]).to(ACC)
    decay = tl.exp(tl.where(causal, diff, float("-inf")))  # [C, C]: exp(g_t - g_s), 0 above the diagonal
    gamma = tl.exp(g.to(ACC))
    to_end = tl.exp((g_last - g).to(ACC))
    gamma_last = tl.exp(g_last.to(ACC))

    kk = tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)
    kkd = tl.where(rows[:, None] > rows[None, :], decay * kk, 0.0)  # D * K K^T, strictly lower
    a = beta[:, None] * kkd
    # T = (I + A)^{-1} by forward substitution: with T = I + X, row i of X is
    # -A[i, :] - A[i, :j<i] X[j<i, :]; rows above i are final when row i is formed.
    x = -a
    for i in range(1, CHUNK):
        row = tl.sum(tl.where(rows[:, None] == i, x, 0.0), axis=0)  # -A[i, :] (zero from column i on)
        row += tl.sum(row[:, None] * x, axis=0) * (rows < i)
        x = tl.where(rows[:, None] == i, row[None, :], x)
    tri = x + tl.where(causal & (rows[:, None] == rows[None, :]), 1.0, 0.0)

    u_tilde = tl.dot(tri, (beta[:, None] * v).to(ACC), input_precision=DOT_PRECISION)  # [C, BV]
    w = tl.dot(tri, ((beta * gamma)[:, None] * k).to(ACC), input_precision=DOT_PRECISION)  # [C, BK]
    p = decay * tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # D * Q K^T
    return q, k, v, beta, decay, kkd, tri, u_tilde, w, p, gamma, to_end, gamma_last


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, log_alpha_ptr, beta_ptr,  # [B, H, T, Dk] x2, [B, H, T, Dv], [B, H, T] x2
    initial_ptr,  # [B, H, Dv, Dk] (read only if HAS_INITIAL)
    o_ptr,  # [B, H, T, Dv] out, v's dtype
    states_ptr,  # [B, H, N, Dk, Dv] out: the state entering each chunk (accumulation dtype)
    final_ptr,  # [B, H, Dv, Dk] out (accumulation dtype)
    T, Dk, Dv, N,
    HAS_INITIAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    v_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    dk = tl.arange(0, BLOCK_K)
    state_mask = (dk < Dk)[:, None] & (v_cols < Dv)[None, :]
    # H[dk, dv] = S[dv, dk]: the [Dv, Dk] layout read transposed.
    state_offsets = v_cols[None, :] * Dk + dk[:, None]
    if HAS_INITIAL:
        state = tl.load(initial_ptr + bh * Dv * Dk + state_offsets, mask=state_mask, other=0.0).to(ACC)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=ACC)
    q_base, v_base, t_base = q_ptr + bh * T * Dk, v_ptr + bh * T * Dv, bh * T
    k_base = k_ptr + bh * T * Dk
    rows = tl.arange(0, CHUNK)
    for n in range(0, N):
        chunk_start = n * CHUNK
        q, k, v, beta, decay, kkd, tri, u_tilde, w, p, gamma, to_end, gamma_last = _chunk_intra(
            q_base, k_base, v_base, log_alpha_ptr + t_base, beta_ptr + t_base, chunk_start, T, Dk, Dv, v_cols,
            CHUNK, BLOCK_K, BLOCK_V, ACC, DOT_PRECISION,
        )
        states_offsets = ((bh * N + n) * Dk + dk[:, None]) * Dv + v_cols[None, :]
        tl.store(states_ptr + states_offsets, state, mask=state_mask)
        u = u_tilde - tl.dot(w, state, input_precision=DOT_PRECISION)  # [C, BV]
        o = tl.dot(gamma[:, None] * q, state, input_precision=DOT_PRECISION) + tl.dot(
            p, u, input_precision=DOT_PRECISION
        )
        t = chunk_start + rows
        o_mask = (t < T)[:, None] & (v_cols < Dv)[None, :]
        tl.store(o_ptr + bh * T * Dv + t[:, None] * Dv + v_cols[None, :], o.to(o_ptr.dtype.element_ty), mask=o_mask)
        state = gamma_last * state + tl.dot(tl.trans(to_end[:, None] * k), u, input_precision=DOT_PRECISION)
    tl.store(final_ptr + bh * Dv * Dk + state_offsets, state, mask=state_mask)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, log_alpha_ptr, beta_ptr,  # as in the forward
    states_ptr,  # [B, H, N, Dk, Dv] from the forward
    grad_o_ptr,  # [B, H, T, Dv]
    grad_final_ptr,  # [B, H, Dv, Dk]
    dq_ptr, dk_ptr,  # [NV, B, H, T, Dk] out: partial sums over this program's value columns
    dlog_alpha_ptr, dbeta_ptr,  # [NV, B, H, T] out: partial sums
    dv_ptr,  # [B, H, T, Dv] out, v's dtype
    d_initial_ptr,  # [B, H, Dv, Dk] out (written only if HAS_INITIAL), accumulation dtype
    T, Dk, Dv, N, BH,
    HAS_INITIAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    v_cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    dk_idx = tl.arange(0, BLOCK_K)
    state_mask = (dk_idx < Dk)[:, None] & (v_cols < Dv)[None, :]
    state_offsets = v_cols[None, :] * Dk + dk_idx[:, None]  # [Dv, Dk] layout read as H = S^T
    d_state = tl.load(grad_final_ptr + bh * Dv * Dk + state_offsets, mask=state_mask, other=0.0).to(ACC)
    q_base, k_base, v_base, t_base = q_ptr + bh * T * Dk, k_ptr + bh * T * Dk, v_ptr + bh * T * Dv, bh * T
    partial_t = (vb * BH + bh) * T  # row of this (block, b, h) in the [NV, B, H, T] partials
    rows = tl.arange(0, CHUNK)
    lower = rows[:, None] >= rows[None, :]  # [t, r]: t >= r
    strictly_upper = rows[:, None] < rows[None, :]  # [s, r]: s < r
    for i in range(0, N):
        n = N - 1 - i
        chunk_start = n * CHUNK
        q, k, v, beta, decay, kkd, tri, u_tilde, w, p, gamma, to_end, gamma_last = _chunk_intra(
            q_base, k_base, v_base, log_alpha_ptr + t_base, beta_ptr + t_base, chunk_start, T, Dk, Dv, v_cols,
            CHUNK, BLOCK_K, BLOCK_V, ACC, DOT_PRECISION,
        )
        t = chunk_start + rows
        t_ok = t < T
        v_mask = t_ok[:, None] & (v_cols < Dv)[None, :]
        k_mask = t_ok[:, None] & (dk_idx < Dk)[None, :]
        states_offsets = ((bh * N + n) * Dk + dk_idx[:, None]) * Dv + v_cols[None, :]
        state = tl.load(states_ptr + states_offsets, mask=state_mask, other=0.0).to(ACC)  # entering [BK, BV]
        do = tl.load(grad_o_ptr + bh * T * Dv + t[:, None] * Dv + v_cols[None, :], mask=v_mask, other=0.0).to(ACC)
        u = u_tilde - tl.dot(w, state, input_precision=DOT_PRECISION)
        kd = to_end[:, None] * k

        # State terms: dU = P^T dO + Kd dH', dH = (gamma Q)^T dO - W^T dU + gamma_last dH'.
        du = tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION) + tl.dot(kd, d_state, input_precision=DOT_PRECISION)
        dqg = tl.dot(do, tl.trans(state), input_precision=DOT_PRECISION)  # d(gamma Q)  [C, BK]
        dp = tl.dot(do, tl.trans(u), input_precision=DOT_PRECISION)  # [C, C]
        dkd = tl.dot(u, tl.trans(d_state), input_precision=DOT_PRECISION)  # [C, BK]
        dgamma_last = tl.sum(tl.sum(d_state * state, axis=1), axis=0)
        d_state = (
            tl.dot(tl.trans(gamma[:, None] * q), do, input_precision=DOT_PRECISION)
            - tl.dot(tl.trans(w), du, input_precision=DOT_PRECISION)
            + gamma_last * d_state
        )

        # Through U = U~ - W H and (I + A) [U~, W] = R:  dR = T^T dX,  dA = -dR X^T (strictly lower).
        dw = -tl.dot(du, tl.trans(state), input_precision=DOT_PRECISION)  # [C, BK]
        drv = tl.dot(tl.trans(tri), du, input_precision=DOT_PRECISION)  # [C, BV]
        drk = tl.dot(tl.trans(tri), dw, input_precision=DOT_PRECISION)  # [C, BK]
        da = -(tl.dot(drv, tl.trans(u_tilde), input_precision=DOT_PRECISION)
               + tl.dot(drk, tl.trans(w), input_precision=DOT_PRECISION))
        da = tl.where(rows[:, None] > rows[None, :], da, 0.0)
        tl.store(dv_ptr + bh * T * Dv + t[:, None] * Dv + v_cols[None, :], (beta[:, None] * drv).to(dv_ptr.dtype.element_ty), mask=v_mask)
        dbg = tl.sum(drk * k, axis=1)
        da_kkd = da * kkd
        dbeta = tl.sum(drv * v, axis=1) + gamma * dbg + tl.sum(da_kkd, axis=1)
        dgamma = tl.sum(dqg * q, axis=1) + beta * dbg

        # A = diag(beta) (D * K K^T), P = D * Q K^T.
        dp_decay = dp * decay  # d(Q K^T)
        dkk = da * beta[:, None] * decay  # d(K K^T)
        dq = gamma[:, None] * dqg + tl.dot(dp_decay, k, input_precision=DOT_PRECISION)
        dk = (
            (beta * gamma)[:, None] * drk
            + tl.dot(dkk + tl.trans(dkk), k, input_precision=DOT_PRECISION)
            + tl.dot(tl.trans(dp_decay), q, input_precision=DOT_PRECISION)
            + to_end[:, None] * dkd
        )

        # d log_alpha window by window (see chunk.py): pairs s < r <= t, gamma (r <= t),
        # g_last - g_t (t < r), g_last (every r).
        pair = tl.where(rows[:, None] > rows[None, :], dp * p + da_kkd * beta[:, None], 0.0)
        before_r = tl.dot(pair, tl.where(strictly_upper, 1.0, 0.0).to(ACC), input_precision=DOT_PRECISION)  # sum_{s<r}
        from_pairs = tl.sum(tl.where(lower, before_r, 0.0), axis=0)  # sum over t >= r
        from_gamma = tl.sum(tl.where(lower, (dgamma * gamma)[:, None], 0.0), axis=0)
        e = tl.sum(dkd * k, axis=1) * to_end
        from_to_end = tl.sum(tl.where(strictly_upper, e[:, None], 0.0), axis=0)
        dlog_alpha = from_pairs + from_gamma + from_to_end + dgamma_last * gamma_last

        tl.store(dq_ptr + (partial_t + t[:, None]) * Dk + dk_idx[None, :], dq, mask=k_mask)
        tl.store(dk_ptr + (partial_t + t[:, None]) * Dk + dk_idx[None, :], dk, mask=k_mask)
        tl.store(dbeta_ptr + partial_t + t, dbeta, mask=t_ok)
        tl.store(dlog_alpha_ptr + partial_t + t, dlog_alpha, mask=t_ok)
    if HAS_INITIAL:
        tl.store(d_initial_ptr + bh * Dv * Dk + state_offsets, d_state, mask=state_mask)


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype, str]:
    """(torch accumulation dtype, Triton accumulation dtype, tl.dot input precision)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return torch.float32, tl.float32, "tf32x3"
    return torch.float32, tl.float32, "tf32"


def _nan(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def _tiles(Dk: int, Dv: int, block_v: int | None, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_V, number of value blocks): powers of two >= 16 covering Dk and Dv."""
    block_k = max(16, triton.next_power_of_2(Dk))
    block_v = block_v or min(MAX_BLOCK_V.get(dtype, 64), max(16, triton.next_power_of_2(Dv)))
    return block_k, block_v, triton.cdiv(Dv, block_v)


def delta_forward(q, k, v, log_alpha, beta, initial_state, chunk, block_v=None, num_warps=4):
    """Launch the forward; returns o, final state, the entering states [B, H, N, Dk, Dv]."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    acc, acc_tl, precision = _accumulation(v.dtype)
    block_k, block_v, n_vblocks = _tiles(Dk, Dv, block_v, v.dtype)
    n_chunks = triton.cdiv(T, chunk)
    o = _nan((B, H, T, Dv), v)
    states = _nan((B, H, n_chunks, Dk, Dv), v, acc)
    final = _nan((B, H, Dv, Dk), v, acc)
    _forward_kernel[(B * H, n_vblocks)](
        q, k, v, log_alpha, beta, initial_state if initial_state is not None else v, o, states, final,
        T, Dk, Dv, n_chunks,
        HAS_INITIAL=initial_state is not None, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        ACC=acc_tl, DOT_PRECISION=precision, num_warps=num_warps,
    )
    return o, final, states


def delta_backward(q, k, v, log_alpha, beta, initial_state, states, grad_o, grad_final, chunk, block_v=None, num_warps=4):
    """Launch the backward; returns dq, dk, dv, dlog_alpha, dbeta (input dtypes) and d initial_state or None."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    acc, acc_tl, precision = _accumulation(v.dtype)
    block_k, block_v, n_vblocks = _tiles(Dk, Dv, block_v, v.dtype)
    n_chunks = triton.cdiv(T, chunk)
    dq = _nan((n_vblocks, B, H, T, Dk), v, acc)
    dk = _nan((n_vblocks, B, H, T, Dk), v, acc)
    dlog_alpha = _nan((n_vblocks, B, H, T), v, acc)
    dbeta = _nan((n_vblocks, B, H, T), v, acc)
    dv = _nan((B, H, T, Dv), v)
    d_initial = _nan((B, H, Dv, Dk), v, acc) if initial_state is not None else None
    _backward_kernel[(B * H, n_vblocks)](
        q, k, v, log_alpha, beta, states, grad_o, grad_final, dq, dk, dlog_alpha, dbeta, dv,
        d_initial if d_initial is not None else dv,
        T, Dk, Dv, n_chunks, B * H,
        HAS_INITIAL=initial_state is not None, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        ACC=acc_tl, DOT_PRECISION=precision, num_warps=num_warps,
    )
    grads = (
        dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv,
        dlog_alpha.sum(0).to(log_alpha.dtype), dbeta.sum(0).to(beta.dtype),
    )
    return grads + (d_initial.to(initial_state.dtype) if d_initial is not None else None,)


class DeltaRuleTritonFunction(torch.autograd.Function):
    """Autograd wrapper around the forward and backward launchers."""

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, beta, initial_state, chunk, block_v):
        o, final, states = delta_forward(q, k, v, log_alpha, beta, initial_state, chunk, block_v)
        ctx.save_for_backward(q, k, v, log_alpha, beta, initial_state, states)
        ctx.chunk, ctx.block_v = chunk, block_v
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_o, grad_final):
        q, k, v, log_alpha, beta, initial_state, states = ctx.saved_tensors
        grads = delta_backward(
            q, k, v, log_alpha, beta, initial_state, states, grad_o.contiguous(), grad_final.contiguous(),
            ctx.chunk, ctx.block_v, num_warps=8 if not INTERPRETED else 4,
        )
        return grads + (None, None)


def delta_rule_triton(
    q: torch.Tensor,  # [B, H, T, Dk] contiguous
    k: torch.Tensor,  # [B, H, T, Dk] contiguous
    v: torch.Tensor,  # [B, H, T, Dv] contiguous
    log_alpha: torch.Tensor,  # [B, H, T] contiguous
    beta: torch.Tensor,  # [B, H, T] contiguous
    initial_state: torch.Tensor | None = None,  # [B, H, Dv, Dk] contiguous
    chunk: int = DEFAULT_CHUNK,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # o [B, H, T, Dv] in v's dtype; final [B, H, Dv, Dk] fp32 (fp64)
    """The Triton gated delta rule, differentiable in every input. Validated by `kernels.delta_rule`.

    chunk must be a power of two >= 16 (tl.dot tiles); block_v (value columns per program, a
    power of two >= 16; default min(64, Dv rounded up)) lets tests cover several value blocks.
    """
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(
            f"delta_rule: backend='triton' needs chunk_size to be a power of two >= 16 (tl.dot tiles), got {chunk}"
        )
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"delta_rule_triton: block_v must be a power of two >= 16, got {block_v}")
    return DeltaRuleTritonFunction.apply(q, k, v, log_alpha, beta, initial_state, chunk, block_v)
