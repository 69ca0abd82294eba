"""Chunk-parallel gated delta rule in PyTorch: the CPU path for fp64/bf16/fp16 (and for fp32 without a C compiler;
fp32 takes fused_recurrent.c), pure torch, so it also runs on GPU.

Per (batch, head), with the state kept transposed inside this module, H = S^T of shape [Dk, Dv]:

    H_t = a_t (I - beta_t k_t k_t^T) H_{t-1} + beta_t k_t v_t^T,    o_t = H_t^T q_t

Inside a chunk (WY / UT form, Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length" and "Gated Delta Networks"). Write the step as
H_t = a_t H_{t-1} + k_t u_t^T with the "new value" u_t = beta_t (v_t - a_t H_{t-1}^T k_t).
With g_t the cumulative sum of log_alpha from the chunk start (t = 0..C-1), gamma_t = exp(g_t),
and H the state entering the chunk, unrolling gives a unit lower-triangular system for U [C, Dv]:

    (I + A) U = diag(beta) V - diag(beta gamma) K H,   A_ts = beta_t exp(g_t - g_s) k_t.k_s  (s < t)

so with the UT transform (I + A)^{-1} applied by one batched triangular solve,

    U~ = (I + A)^{-1} diag(beta) V,   W = (I + A)^{-1} diag(beta gamma) K,   U = U~ - W H
    O  = diag(gamma) Q H + (D * Q K^T) U,          D_ts = exp(g_t - g_s) for s <= t, else 0
    H' = gamma_last H + (diag(exp(g_last - g)) K)^T U

Everything that does not involve H (A, the solve, U~, W, D * Q K^T) is computed for all chunks
at once as batched matmuls; the state is carried across chunks by one Python loop over the T/C
chunks (two small matmuls per chunk). Decays are only ever exp of DIFFERENCES g_t - g_s with
s <= t (or exp(g_t), g_last - g_t), i.e. exp of numbers <= 0: log_alpha = -20 per step underflows
to 0, never overflows, so no inf * 0 = NaN. Entries above the diagonal are masked with -inf
before the exp. g is accumulated in float64 (an fp32 cumsum reaching -20 C would put a 1e-4
relative error into every decay) and rounded to the compute dtype only as differences; the
backward sums d log_alpha window by window so that it stays accurate when it is tiny (see
`chunk_backward`). T not divisible by C is padded with log_alpha = 0, beta = 0, q = k = v = 0
(steps that pass the state through unchanged) and the outputs are cut.

Backward: hand-written (`DeltaRuleChunkFunction`). The forward keeps only its inputs and the
state entering every chunk, [B*H, T/C, Dk, Dv] (T * Dk * Dv / C numbers per head, the same as
one [T, 64] tensor at C = Dk = Dv = 64); the backward recomputes the intra-chunk quantities
for all chunks at once, carries dH backwards over the chunks in one Python loop, then forms
every gradient with batched matmuls. Measured against autograd through the same forward
(`chunk_forward` with grad enabled) at B 8, H 4, T 2048, Dk = Dv = 64, C 64, one thread:
saved for backward 64.5 MB (48.5 MB inputs + 16 MB chunk states) against 273 MB (5.6x the
inputs: autograd keeps the [T, C] decay/A/P matrices, the solve's factors and U~, W, U), the
same ratios at T 8192, so both are linear in T; and 0.49 s against 0.88 s CPU time per
forward + backward. The hand-written backward is the one used. Nothing of size [T, Dk, Dv] is
ever formed; the backward's transient [B*H, T/C, C, C] temporaries live only inside it.

Accumulation: bf16/fp16 inputs are computed in fp32 (the state is fp32), fp64 inputs in fp64
(so that gradcheck is meaningful). Keys are expected L2-normalised by the caller (then every
factor (I - beta k k^T) is a contraction and the triangular system is well conditioned), but
nothing here assumes it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunked(NamedTuple):
    """Inputs in the compute dtype, padded to N * C steps, viewed as [B*H, N, C, ...]."""

    q: torch.Tensor  # [BH, N, C, Dk]
    k: torch.Tensor  # [BH, N, C, Dk]
    v: torch.Tensor  # [BH, N, C, Dv]
    g: torch.Tensor  # [BH, N, C] cumulative log decay from the chunk start (inclusive), ALWAYS float64
    beta: torch.Tensor  # [BH, N, C]


class _Intra(NamedTuple):
    """Everything inside a chunk that does not depend on the state entering it."""

    decay: torch.Tensor  # [BH, N, C, C] D: exp(g_t - g_s) for s <= t, 0 above the diagonal
    kkd: torch.Tensor  # [BH, N, C, C] D * K K^T, strictly lower triangular
    a: torch.Tensor  # [BH, N, C, C] A = diag(beta) (D * K K^T), strictly lower triangular
    gamma: torch.Tensor  # [BH, N, C] exp(g_t)
    solution: torch.Tensor  # [BH, N, C, Dv + Dk] (I + A)^{-1} [diag(beta) V, diag(beta gamma) K] = [U~, W]
    u_tilde: torch.Tensor  # [BH, N, C, Dv] view into solution
    w: torch.Tensor  # [BH, N, C, Dk] view into solution
    p: torch.Tensor  # [BH, N, C, C] D * Q K^T
    to_end: torch.Tensor  # [BH, N, C] exp(g_last - g_t)
    gamma_last: torch.Tensor  # [BH, N] exp(g_last)


def _to_chunks(q, k, v, log_alpha, beta, chunk: int) -> _Chunked:
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    work = compute_dtype(v.dtype)
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T

    def prepare(x: torch.Tensor, width: int | None) -> torch.Tensor:
        x = x.to(work)
        if pad:  # padded steps: log_alpha = 0, beta = 0, q = k = v = 0 pass the state through
            x = F.pad(x, (0, 0, 0, pad) if width is not None else (0, pad))
        shape = (B * H, n_chunks, chunk) + ((width,) if width is not None else ())
        return x.reshape(shape)

    # float64: with log_alpha ~ -20, g reaches -20 C, where an fp32 ulp (1e-4 at 1280) would put
    # a 1e-4 relative error into every exp(g_t - g_s). Differences are rounded to fp32 only after.
    g = prepare(log_alpha, None).double().cumsum(-1)
    return _Chunked(prepare(q, Dk), prepare(k, Dk), prepare(v, Dv), g, prepare(beta, None))


def _intra(c: _Chunked) -> _Intra:
    C = c.g.shape[-1]
    Dv = c.v.shape[-1]
    work = c.k.dtype
    causal = torch.ones(C, C, dtype=torch.bool, device=c.g.device).tril()
    # exp of g_t - g_s <= 0 on and below the diagonal; -inf above it, so the exp never overflows.
    # (Out-of-place where autograd would need the overwritten value: chunk_forward stays
    # differentiable by autograd, which the tests and the benchmark compare against.)
    decay = (c.g[..., :, None] - c.g[..., None, :]).to(work).masked_fill_(~causal, float("-inf")).exp_()
    kt = c.k.transpose(-1, -2)
    kkd = (decay * (c.k @ kt)).tril_(-1)
    a = c.beta[..., :, None] * kkd
    gamma = c.g.to(work).exp()
    rhs = torch.cat([c.beta[..., None] * c.v, (c.beta * gamma)[..., None] * c.k], dim=-1)
    # unitriangular: the diagonal of `a` (zero) is not read; the solve is with I + A.
    solution = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    g_last = c.g[..., -1:]
    return _Intra(
        decay=decay, kkd=kkd, a=a, gamma=gamma, solution=solution,
        u_tilde=solution[..., :Dv], w=solution[..., Dv:], p=decay * (c.q @ kt),
        to_end=(g_last - c.g).to(work).exp(), gamma_last=g_last[..., 0].to(work).exp(),
    )


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """y_r = sum_{s < r} x_s along the last dimension."""
    return F.pad(x[..., :-1], (1, 0)).cumsum(-1)


def _initial(h0: torch.Tensor | None, c: _Chunked) -> torch.Tensor:
    """The state entering the first chunk, transposed to [BH, Dk, Dv], in the compute dtype."""
    BH, Dk, Dv = c.k.shape[0], c.k.shape[-1], c.v.shape[-1]
    if h0 is None:
        return c.k.new_zeros(BH, Dk, Dv)
    return h0.to(c.k.dtype).reshape(BH, Dv, Dk).transpose(-1, -2)


def chunk_forward(
    q: torch.Tensor,  # [B, H, T, Dk]
    k: torch.Tensor,  # [B, H, T, Dk]
    v: torch.Tensor,  # [B, H, T, Dv]
    log_alpha: torch.Tensor,  # [B, H, T]
    beta: torch.Tensor,  # [B, H, T]
    initial_state: torch.Tensor | None,  # [B, H, Dv, Dk]
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked forward in plain torch ops (differentiable by autograd as written).

    Returns o [B, H, T, Dv] in v's dtype, the final state [B, H, Dv, Dk] in the compute dtype,
    and the states entering every chunk [B*H, N, Dk, Dv] (compute dtype, H = S^T layout).
    """
    B, H, T, _ = k.shape
    Dv = v.shape[-1]
    c = _to_chunks(q, k, v, log_alpha, beta, chunk)
    intra = _intra(c)
    kd_t = (intra.to_end[..., None] * c.k).transpose(-1, -2)  # [BH, N, Dk, C]
    state = _initial(initial_state, c)
    states, us = [], []
    for n in range(c.g.shape[1]):  # one step per chunk: the only sequential part
        states.append(state)
        u = torch.baddbmm(intra.u_tilde[:, n], intra.w[:, n], state, alpha=-1)  # U = U~ - W H
        us.append(u)
        state = torch.baddbmm(intra.gamma_last[:, n, None, None] * state, kd_t[:, n], u)
    entering = torch.stack(states, dim=1)  # [BH, N, Dk, Dv]
    u = torch.stack(us, dim=1)
    o = (intra.gamma[..., None] * c.q) @ entering + intra.p @ u  # [BH, N, C, Dv]
    o = o.reshape(B, H, -1, Dv)[:, :, :T].to(v.dtype)
    final = state.transpose(-1, -2).reshape(B, H, Dv, -1).contiguous()
    return o, final, entering


def chunk_backward(
    q, k, v, log_alpha, beta,  # [B, H, T, *] inputs as given to the forward
    initial_state: torch.Tensor | None,  # [B, H, Dv, Dk]
    entering: torch.Tensor,  # [BH, N, Dk, Dv] states entering each chunk (from the forward)
    grad_o: torch.Tensor,  # [B, H, T, Dv]
    grad_final: torch.Tensor,  # [B, H, Dv, Dk]
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, ...]:  # dq, dk, dv, dlog_alpha, dbeta in their inputs' dtypes; d initial_state or None
    """Gradients of every input: intra-chunk terms recomputed, dH carried backwards over chunks."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    c = _to_chunks(q, k, v, log_alpha, beta, chunk)
    BH, N, C = c.g.shape
    work = c.k.dtype
    i = _intra(c)
    do = F.pad(grad_o.to(work), (0, 0, 0, N * C - T)).reshape(BH, N, C, Dv)
    u = i.u_tilde - i.w @ entering  # U for every chunk at once, from the saved entering states
    kd = i.to_end[..., None] * c.k  # [BH, N, C, Dk]

    # The sequential part: dH (gradient of the state after chunk n) backwards over chunks.
    #   dU_n = P_n^T dO_n + Kd_n dH_n'      dH_n = (gamma Q)_n^T dO_n - W_n^T dU_n + gamma_last_n dH_n'
    du = i.p.transpose(-1, -2) @ do  # [BH, N, C, Dv], completed in the loop
    dh_from_o = (i.gamma[..., None] * c.q).transpose(-1, -2) @ do  # [BH, N, Dk, Dv]
    d_leaving = torch.empty_like(entering)  # gradient of the state leaving each chunk
    dh = grad_final.to(work).reshape(BH, Dv, Dk).transpose(-1, -2)
    w_t = i.w.transpose(-1, -2)
    for n in reversed(range(N)):
        d_leaving[:, n] = dh
        du_n = torch.baddbmm(du[:, n], kd[:, n], dh)
        du[:, n] = du_n
        dh = torch.baddbmm(dh_from_o[:, n] + i.gamma_last[:, n, None, None] * dh, w_t[:, n], du_n, alpha=-1)
    d_initial = dh

    # Output and state-update terms.
    dqg = do @ entering.transpose(-1, -2)  # d(gamma Q)   [BH, N, C, Dk]
    dq = i.gamma[..., None] * dqg
    dgamma = (dqg * c.q).sum(-1)
    dp = do @ u.transpose(-1, -2)  # [BH, N, C, C]
    dkd = u @ d_leaving.transpose(-1, -2)  # [BH, N, C, Dk]
    dgamma_last = (d_leaving * entering).sum((-2, -1))  # [BH, N]

    # Through U = U~ - W H and the solve (I + A) [U~, W] = R:  dR = (I + A)^{-T} dX,  dA = -dR X^T.
    dx = torch.cat([du, du @ entering.transpose(-1, -2)], dim=-1)
    dx[..., Dv:].neg_()
    dr = torch.linalg.solve_triangular(i.a.transpose(-1, -2), dx, upper=True, unitriangular=True)
    da = (dr @ i.solution.transpose(-1, -2)).tril_(-1).neg_()
    drv, drk = dr[..., :Dv], dr[..., Dv:]
    dv = c.beta[..., None] * drv
    dbeta = (drv * c.v).sum(-1)
    dk = (c.beta * i.gamma)[..., None] * drk
    dbg = (drk * c.k).sum(-1)
    dbeta += i.gamma * dbg
    dgamma += c.beta * dbg

    # A = diag(beta) (D * K K^T) and P = D * Q K^T.  `pair` collects d(g_t - g_s) for s < t:
    # dA * A + dP * P (D's derivative is D itself); the diagonal (g_t - g_t = 0) gets none.
    dp_decay = dp * i.decay  # d(Q K^T)
    pair = dp.mul_(i.p)
    pair.diagonal(dim1=-2, dim2=-1).zero_()
    da_kkd = da * i.kkd
    dbeta += da_kkd.sum(-1)
    pair.addcmul_(da_kkd, c.beta[..., :, None])
    dkk = da.mul_(c.beta[..., :, None]).mul_(i.decay)  # d(K K^T)
    dk += (dkk + dkk.transpose(-1, -2)) @ c.k + dp_decay.transpose(-1, -2) @ c.q + i.to_end[..., None] * dkd
    dq += dp_decay @ c.k

    # d log_alpha. Each decay is exp of a sum of log_alpha over a window, so its gradient goes to
    # every step in that window. Summing window by window (never as dg_t - dg_s of per-step
    # cumulative terms) keeps it accurate when the true gradient is tiny (log_alpha ~ -20):
    # the exp(0) = 1 terms of the diagonal and of g_last - g_last would otherwise cancel only
    # up to fp32 rounding of O(1) numbers. (Exclusive cumsums shift, never subtract, for the same reason.)
    #   g_t - g_s  (s < t)   covers steps s+1..t     -> sum over pairs with s < r <= t
    #   g_t                  covers steps 0..t       -> reverse cumsum
    #   g_last - g_t         covers steps t+1..last  -> exclusive cumsum
    #   g_last               covers every step
    # pairs: with cum_tj = sum_{s <= j} pair_ts, the sum for step r is sum_{t > r-1} cum_{t, r-1}.
    from_pairs = F.pad(pair.cumsum(-1).tril_(-1).sum(-2)[..., :-1], (1, 0))
    from_gamma = (dgamma * i.gamma).flip(-1).cumsum(-1).flip(-1)
    from_to_end = _exclusive_cumsum((dkd * c.k).sum(-1) * i.to_end)
    dlog_alpha = from_pairs + from_gamma + from_to_end + (dgamma_last * i.gamma_last)[..., None]

    def unchunk(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.reshape(B, H, N * C, *x.shape[3:])[:, :, :T].to(like.dtype)

    grads = (unchunk(dq, q), unchunk(dk, k), unchunk(dv, v), unchunk(dlog_alpha, log_alpha), unchunk(dbeta, beta))
    d_init = None
    if initial_state is not None:
        d_init = d_initial.transpose(-1, -2).reshape(B, H, Dv, Dk).to(initial_state.dtype)
    return grads + (d_init,)


class DeltaRuleChunkFunction(torch.autograd.Function):
    """Autograd wrapper: forward by `chunk_forward` (no graph), backward by `chunk_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, beta, initial_state, chunk):
        o, final, entering = chunk_forward(q, k, v, log_alpha, beta, initial_state, chunk)
        ctx.save_for_backward(q, k, v, log_alpha, beta, initial_state, entering)
        ctx.chunk = chunk
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_o, grad_final):
        q, k, v, log_alpha, beta, initial_state, entering = ctx.saved_tensors
        grads = chunk_backward(q, k, v, log_alpha, beta, initial_state, entering, grad_o, grad_final, ctx.chunk)
        return grads + (None,)


def delta_rule_chunk(
    q: torch.Tensor,  # [B, H, T, Dk]
    k: torch.Tensor,  # [B, H, T, Dk]
    v: torch.Tensor,  # [B, H, T, Dv]
    log_alpha: torch.Tensor,  # [B, H, T]
    beta: torch.Tensor,  # [B, H, T]
    initial_state: torch.Tensor | None = None,  # [B, H, Dv, Dk]
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:  # o [B, H, T, Dv] in v's dtype; final state [B, H, Dv, Dk] fp32 (fp64)
    """The chunked gated delta rule, differentiable in every input. Validated by `kernels.delta_rule`."""
    if chunk < 1:
        raise ValueError(f"delta_rule_chunk: chunk must be a positive number of time steps, got {chunk}")
    # A sequence shorter than the chunk is one chunk of its own length (the chunk size does not
    # change the result): a step-by-step decode (T = 1) costs no [64, 64] padding.
    chunk = min(chunk, q.shape[2])
    return DeltaRuleChunkFunction.apply(q, k, v, log_alpha, beta, initial_state, chunk)
