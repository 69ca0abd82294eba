"""The gated delta rule step by step in one C kernel (fused_recurrent.c), forward and backward: the
path for fp32 CPU tensors (built on first use by kernels.c_build; a C compiler is needed).

On one CPU core the chunked form (chunk.py) spends most of its time on elementwise passes over
its [C, C] intra-chunk matrices and on small matmuls; here each step is a few passes over a
[Dk, Dv] state that stays in L1. Memory saved for backward: the inputs and the state every 64
steps ([B*H, ceil(T/64), Dk, Dv], half what the chunk path keeps at C = 32); the backward
recomputes each 64-step segment from its checkpoint. Heads run on torch.get_num_threads()
POSIX threads.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels import c_build

SOURCE = Path(__file__).with_name("fused_recurrent.c")
# Reductions (dot products of state rows) vectorise only if the compiler may reassociate sums;
# NaN and inf keep their IEEE behaviour (no -ffinite-math-only).
FLAGS = ("-fno-signed-zeros", "-fno-trapping-math", "-fassociative-math")
CHECKPOINT = 64  # as in fused_recurrent.c
MAX_DV = 4096  # as in fused_recurrent.c


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
KERNEL = c_build.CKernel(SOURCE, {
    "delta_rule_forward": ([_i64] * 4 + [_ptr] * 9 + [_int], _int),
    "delta_rule_backward": ([_i64] * 4 + [_ptr] * 14 + [_int], _int),
}, FLAGS)
_library = KERNEL.library
available = KERNEL.available


def supports(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> bool:
    """fp32 CPU inputs (and an fp32 initial state, if any) with Dv <= MAX_DV."""
    state_ok = initial_state is None or initial_state.dtype == torch.float32
    return q.device.type == "cpu" and q.dtype == torch.float32 and v.shape[-1] <= MAX_DV and state_ok


_STATUS = {-2: "out of memory", -4: f"Dv above {MAX_DV}"}


def _call(name: str, *args) -> None:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"delta rule C kernel unavailable: {why}")
    status = getattr(lib, name)(*args, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"delta rule C kernel: {name} failed (status {status}: {_STATUS.get(status, 'unknown')})")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward_into(q, k, v, log_alpha, beta, h0, o, h_final, checkpoints) -> None:
    """All contiguous fp32. q, k [BH, T, Dk]; v [BH, T, Dv]; log_alpha, beta [BH, T]; h0 (H = S^T layout)
    [BH, Dk, Dv] or None. Writes o [BH, T, Dv], h_final [BH, Dk, Dv], checkpoints [BH, ceil(T/64), Dk, Dv]."""
    BH, T, Dk = k.shape
    _call("delta_rule_forward", BH, T, Dk, v.shape[-1], *map(_ptr, (q, k, v, log_alpha, beta, h0, o, h_final,
                                                                   checkpoints)))


def backward_into(q, k, v, log_alpha, beta, checkpoints, grad_o, grad_final, dq, dk, dv, dlog_alpha, dbeta, dh0) -> None:
    """Gradients of every input (dh0 None: not wanted); grad_final and dh0 in the H = S^T layout [BH, Dk, Dv]."""
    BH, T, Dk = k.shape
    _call("delta_rule_backward", BH, T, Dk, v.shape[-1], *map(_ptr, (q, k, v, log_alpha, beta, checkpoints, grad_o,
                                                                    grad_final, dq, dk, dv, dlog_alpha, dbeta, dh0)))


class DeltaRuleFusedRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_alpha, beta, initial_state):
        # q, k [B, H, T, Dk], v [B, H, T, Dv], log_alpha, beta [B, H, T], initial_state [B, H, Dv, Dk] or None
        B, H, T, Dk = k.shape
        Dv = v.shape[-1]
        flat = [t.reshape(B * H, *t.shape[2:]).contiguous() for t in (q, k, v, log_alpha, beta)]
        h0 = None if initial_state is None else initial_state.transpose(-1, -2).reshape(B * H, Dk, Dv).contiguous()
        o = torch.empty(B * H, T, Dv)
        h_final = torch.empty(B * H, Dk, Dv)
        checkpoints = torch.empty(B * H, -(-T // CHECKPOINT), Dk, Dv)
        forward_into(*flat, h0, o, h_final, checkpoints)
        ctx.save_for_backward(*flat, checkpoints)
        ctx.shape, ctx.has_initial = (B, H, T, Dk, Dv), initial_state is not None
        return o.view(B, H, T, Dv), h_final.view(B, H, Dk, Dv).transpose(-1, -2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o, grad_final):
        q, k, v, log_alpha, beta, checkpoints = ctx.saved_tensors
        B, H, T, Dk, Dv = ctx.shape
        grad_o = torch.zeros(B * H, T, Dv) if grad_o is None else grad_o.reshape(B * H, T, Dv).contiguous()
        if grad_final is None:
            grad_final = torch.zeros(B * H, Dk, Dv)
        else:
            grad_final = grad_final.transpose(-1, -2).reshape(B * H, Dk, Dv).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dlog_alpha, dbeta = torch.empty_like(log_alpha), torch.empty_like(beta)
        dh0 = torch.empty(B * H, Dk, Dv) if ctx.has_initial and ctx.needs_input_grad[5] else None
        backward_into(q, k, v, log_alpha, beta, checkpoints, grad_o, grad_final, dq, dk, dv, dlog_alpha, dbeta, dh0)
        d_initial = None if dh0 is None else dh0.view(B, H, Dk, Dv).transpose(-1, -2)
        return (dq.view(B, H, T, Dk), dk.view(B, H, T, Dk), dv.view(B, H, T, Dv), dlog_alpha.view(B, H, T),
                dbeta.view(B, H, T), d_initial)


def delta_rule_fused_recurrent(q, k, v, log_alpha, beta, initial_state):
    """o [B, H, T, Dv] fp32 and the final state [B, H, Dv, Dk] fp32 (see kernels.delta.delta_rule)."""
    tensors = [q, k, v, log_alpha, beta] + ([initial_state] if initial_state is not None else [])
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or v.shape[-1] > MAX_DV:
        raise ValueError("delta_rule_fused_recurrent takes fp32 CPU tensors with Dv <= "
                         f"{MAX_DV}; got {[(t.dtype, t.device.type) for t in tensors]}, Dv {v.shape[-1]}")
    return DeltaRuleFusedRecurrentFunction.apply(q, k, v, log_alpha, beta, initial_state)
