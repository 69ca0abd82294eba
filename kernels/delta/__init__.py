"""The gated delta rule: one validated entry point over three paths.

Per batch b and head h, with a matrix state S of shape [Dv, Dk]:

    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t,
    a_t = exp(log_alpha_t) in (0, 1],  beta_t in [0, 1]

    reference.py           float64 per-step loop, ground truth for tests
    chunk.py               chunk-parallel PyTorch (WY / UT form, hand-written backward): any device and dtype
    fused_recurrent.py     step by step in one C kernel (fused_recurrent.c): the path for fp32 CPU tensors
    triton_delta.py        chunked Triton kernels (forward and backward); the path for CUDA tensors

`kernels.delta_rule` (this module's `delta_rule`) chooses by device and dtype unless `backend=`
forces a path: Triton on CUDA, the C kernel for fp32 on CPU when it could be built (a C compiler
is needed; without one, one warning says so and the chunk path runs), the chunk path otherwise.
"""
from __future__ import annotations

import torch

from kernels.delta import fused_recurrent
from kernels.delta.chunk import delta_rule_chunk
from kernels.delta.reference import delta_rule_reference

BACKENDS = ("triton", "chunk", "fused_recurrent", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_inputs(q, k, v, log_alpha, beta, initial_state, chunk_size) -> None:
    expected = {
        "q": "[B, H, T, Dk]", "k": "[B, H, T, Dk]", "v": "[B, H, T, Dv]", "log_alpha": "[B, H, T]", "beta": "[B, H, T]",
    }
    given = {"q": q, "k": k, "v": v, "log_alpha": log_alpha, "beta": beta}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"delta_rule: {name} must be a torch.Tensor of shape {expected[name]}, got {type(value).__name__}"
            )
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        raise ValueError(
            f"delta_rule: initial_state must be None or a torch.Tensor of shape [B, H, Dv, Dk], "
            f"got {type(initial_state).__name__}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size must be a positive int (time steps per chunk), got {chunk_size!r}")
    if q.dim() != 4:
        raise ValueError(f"delta_rule: q must have shape [B, H, T, Dk], got {tuple(q.shape)}")
    B, H, T, Dk = q.shape
    if T == 0:
        raise ValueError("delta_rule: the sequence is empty (T = 0); pass at least one time step")
    if Dk == 0:
        raise ValueError(f"delta_rule: q and k need a key width Dk >= 1, got q of shape {tuple(q.shape)}")
    if tuple(k.shape) != (B, H, T, Dk):
        raise ValueError(f"delta_rule: k must have shape [B, H, T, Dk] = {[B, H, T, Dk]} like q, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, T) or v.shape[3] == 0:
        raise ValueError(
            f"delta_rule: v must have shape [B, H, T, Dv] = {[B, H, T, 'Dv >= 1']} to match q {tuple(q.shape)}, "
            f"got {tuple(v.shape)}"
        )
    Dv = v.shape[3]
    for name in ("log_alpha", "beta"):
        if tuple(given[name].shape) != (B, H, T):
            raise ValueError(
                f"delta_rule: {name} must have shape [B, H, T] = {[B, H, T]} to match q {tuple(q.shape)}, "
                f"got {tuple(given[name].shape)}"
            )
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dv, Dk):
        raise ValueError(
            f"delta_rule: initial_state must have shape [B, H, Dv, Dk] = {[B, H, Dv, Dk]} to match q "
            f"{tuple(q.shape)} and v {tuple(v.shape)}, got {tuple(initial_state.shape)}"
        )
    if v.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"delta_rule: v has dtype {v.dtype}; use one of {[str(d) for d in SUPPORTED_DTYPES]}")
    dtypes = {name: t.dtype for name, t in given.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"delta_rule: q, k, v, log_alpha and beta must share one dtype, got {dtypes}; cast them to v's dtype ({v.dtype})")
    if initial_state is not None:
        allowed = (v.dtype, torch.float32) if v.dtype in HALF_DTYPES else (v.dtype,)
        if initial_state.dtype not in allowed:
            raise ValueError(
                f"delta_rule: initial_state has dtype {initial_state.dtype}; with {v.dtype} inputs it must be "
                f"{' or '.join(str(d) for d in allowed)}"
            )
    tensors = given | ({"initial_state": initial_state} if initial_state is not None else {})
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"delta_rule: inputs must be on one device, got {devices}; move them to v's device ({v.device})")


def _choose(backend: str | None, q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> str:
    """The forced backend, or by device: Triton on CUDA, the C kernel for fp32 CPU tensors when it
    builds (one warning if it does not), the chunk path otherwise."""
    if backend not in (None, "fused_recurrent"):
        return backend
    if backend is None and v.is_cuda:
        return "triton"
    fits = fused_recurrent.supports(q, v, initial_state)
    if backend == "fused_recurrent" and not fits:
        raise ValueError("delta_rule: backend='fused_recurrent' takes fp32 CPU tensors (and an fp32 initial_state) "
                         f"with Dv <= {fused_recurrent.MAX_DV}; got {v.dtype} on {v.device}. Use backend='chunk'")
    chosen = fused_recurrent.KERNEL.choose(fits, forced=backend is not None, caller="delta_rule",
                                           fallback="the chunk path (kernels.delta.chunk)")
    return "fused_recurrent" if chosen else "chunk"


def delta_rule(
    q: torch.Tensor,  # [B, H, T, Dk]
    k: torch.Tensor,  # [B, H, T, Dk], L2-normalised by the caller (see below)
    v: torch.Tensor,  # [B, H, T, Dv]
    log_alpha: torch.Tensor,  # [B, H, T], log decay, <= 0
    beta: torch.Tensor,  # [B, H, T], write strength in [0, 1]
    initial_state: torch.Tensor | None = None,  # [B, H, Dv, Dk]; None means zeros
    *,
    chunk_size: int = 64,
    backend: str | None = None,  # None: "triton" on CUDA, "fused_recurrent" for fp32 on CPU, else "chunk"
) -> tuple[torch.Tensor, torch.Tensor]:  # o [B, H, T, Dv] in v's dtype; final state [B, H, Dv, Dk] fp32 (fp64 for fp64)
    """The gated delta rule, differentiable in q, k, v, log_alpha, beta and initial_state.

    Keys should be L2-normalised by the caller (as the model does): then every factor
    I - beta_t k_t k_t^T is a contraction for beta in [0, 1] and the state stays bounded. The op
    itself is exact for any keys, but with large ||k|| the state can grow without bound.
    log_alpha <= 0 and beta in [0, 1] are not checked, because checking would cost a device sync
    on every call. bf16/fp16 inputs accumulate in fp32 on every path (the state is always fp32;
    initial_state may be fp32 or the inputs' dtype). The final state can be passed back as
    `initial_state` to continue the sequence: two calls equal one call over the whole sequence.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"delta_rule: unknown backend {backend!r}; choose one of {BACKENDS} or None (by device)")
    _check_inputs(q, k, v, log_alpha, beta, initial_state, chunk_size)
    chosen = _choose(backend, q, v, initial_state)
    inputs = [t.contiguous() for t in (q, k, v, log_alpha, beta)]
    state = initial_state.contiguous() if initial_state is not None else None
    if chosen == "fused_recurrent":
        return fused_recurrent.delta_rule_fused_recurrent(*inputs, state)
    if chosen == "chunk":
        return delta_rule_chunk(*inputs, state, chunk_size)
    if chosen == "reference":
        o, final = delta_rule_reference(*inputs, state)
        return o.to(v.dtype), final.to(torch.float64 if v.dtype == torch.float64 else torch.float32)
    # Imported here so that CPU-only users never pay for (or depend on) importing Triton.
    from kernels.delta import triton_delta

    if not v.is_cuda and not triton_delta.INTERPRETED:
        raise ValueError(
            "delta_rule: backend='triton' needs CUDA tensors; on CPU tensors it only runs under the Triton "
            "interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported. "
            "Use backend='chunk' (or None) for CPU tensors."
        )
    return triton_delta.delta_rule_triton(*inputs, state, chunk_size)


__all__ = ["BACKENDS", "delta_rule", "delta_rule_chunk", "delta_rule_reference"]
