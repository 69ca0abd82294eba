"""The chunk-parallel PyTorch gated delta rule against the float64 reference: values, final
state, gradients of every input, dtypes, gate extremes, chunking and memory."""
from __future__ import annotations

import functools

import pytest
import torch

from kernels.delta.chunk import chunk_forward, delta_rule_chunk
from kernels.delta.reference import delta_rule_reference

# (B, H, T, Dk, Dv) with chunk 16: T = 1; T < chunk; T a multiple of the chunk; a ragged last chunk.
SHAPES = [(1, 1, 1, 4, 4), (2, 1, 11, 8, 5), (1, 2, 48, 16, 16), (2, 2, 37, 12, 20)]
FP32_TOLERANCE = 1e-5
# bf16/fp16 inputs: o and the gradients are rounded to the input dtype (bf16: 8 significant bits);
# the final state is fp32 and computed in fp32 from inputs that are exact in fp32.
HALF_TOLERANCE = {"default": 1e-2, "final": 1e-5}


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("mode", ["moderate", "strong", "weak", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, mode, with_state, make_delta_case, check_delta_against_reference):
    case = make_delta_case(*shape, mode=mode, with_state=with_state)
    check_delta_against_reference(functools.partial(delta_rule_chunk, chunk=16), case, FP32_TOLERANCE)


@pytest.mark.parametrize("T", [1, 50, 64, 65])
def test_default_chunk_size(T, make_delta_case, check_delta_against_reference):
    # chunk 64 (the model's): T < chunk, T = chunk, one step past it.
    case = make_delta_case(1, 2, T, 16, 16, mode="mixed")
    check_delta_against_reference(delta_rule_chunk, case, FP32_TOLERANCE)


@pytest.mark.parametrize("chunk", [1, 3, 16, 128])
def test_chunk_size_does_not_change_results(chunk, make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 2, 100, 8, 8, mode="mixed")
    check_delta_against_reference(functools.partial(delta_rule_chunk, chunk=chunk), case, FP32_TOLERANCE)


def test_unnormalised_small_keys(make_delta_case, check_delta_against_reference):
    # The op is exact for any keys; the model normalises them. Raw randn keys scaled to ||k|| = 0.5.
    case = make_delta_case(2, 2, 45, 8, 8, mode="mixed", key_norm=0.5)
    check_delta_against_reference(functools.partial(delta_rule_chunk, chunk=16), case, FP32_TOLERANCE)


@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["state_same", "state_fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, state_dtype, make_delta_case, check_delta_against_reference):
    case = make_delta_case(2, 2, 70, 16, 16, mode="mixed", dtype=dtype, state_dtype=state_dtype)
    check_delta_against_reference(functools.partial(delta_rule_chunk, chunk=16), case, HALF_TOLERANCE)


def test_half_precision_accumulates_in_fp32(make_delta_case):
    # 400 small writes (beta ~ 1e-3) into a slowly decaying state: accumulated in bf16, each step's
    # update would mostly round away (2^-8 relative). The fp32 state matches the float64 loop.
    case = make_delta_case(1, 1, 400, 16, 16, mode="weak", dtype=torch.bfloat16)
    inputs = case.inputs()
    _, final = delta_rule_chunk(*inputs.values())
    _, final_ref = delta_rule_reference(*inputs.values())
    assert final.dtype == torch.float32
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_float64_inputs(make_delta_case, check_delta_against_reference):
    case = make_delta_case(1, 2, 30, 6, 5, mode="mixed", dtype=torch.float64)
    check_delta_against_reference(functools.partial(delta_rule_chunk, chunk=8), case, 1e-12)


def test_gradcheck_float64(generator):
    B, H, T, Dk, Dv = 1, 2, 7, 3, 2
    q = torch.randn(B, H, T, Dk, generator=generator, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk, generator=generator, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=generator, dtype=torch.float64)
    log_alpha = -torch.rand(B, H, T, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=generator, dtype=torch.float64)
    state = torch.randn(B, H, Dv, Dk, generator=generator, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, log_alpha, beta, state))
    # chunk 3: the gradient crosses two chunk boundaries and a ragged (padded) last chunk.
    # fast_mode: random directional derivatives instead of the full Jacobian (seconds less).
    assert torch.autograd.gradcheck(lambda *x: delta_rule_chunk(*x, chunk=3), inputs, fast_mode=True)


def test_extreme_decays_stay_finite(make_delta_case):
    # log_alpha = -1000 per step: the chunk's cumulative decay reaches -64000; only exp of
    # differences <= 0 is ever taken, so everything underflows to 0 instead of inf * 0 = NaN.
    case = make_delta_case(2, 2, 150, 8, 8, mode="strong")
    log_alpha = torch.full_like(case.log_alpha, -1000.0).requires_grad_(True)
    inputs = {k: v.clone().requires_grad_(True) for k, v in case.inputs().items() if k != "log_alpha"}
    o, final = delta_rule_chunk(inputs["q"], inputs["k"], inputs["v"], log_alpha, inputs["beta"], inputs["initial_state"])
    (o.sum() + final.sum()).backward()
    results = {"o": o, "final": final, "dlog_alpha": log_alpha.grad} | {f"d{k}": v.grad for k, v in inputs.items()}
    for name, tensor in results.items():
        assert torch.isfinite(tensor).all(), name
    # With a_t ~ 0 the state holds only the last write: S_t = beta_t v_t k_t^T.
    last = case.beta[:, :, -1, None, None] * case.v[:, :, -1, :, None] * case.k[:, :, -1, None, :]
    torch.testing.assert_close(final.detach(), last, rtol=1e-5, atol=1e-6)


def test_chunked_calls_equal_one_call(make_delta_case):
    # Two calls with the first call's final state as the second's initial state are the same
    # recurrence as one call: outputs, final state, and the gradients flowing back through the state.
    case = make_delta_case(2, 2, 100, 8, 8, mode="mixed")
    names = ("q", "k", "v", "log_alpha", "beta")

    def run(split: int | None):
        leaves = {k: v.clone().requires_grad_(True) for k, v in case.inputs().items()}
        if split is None:
            o, final = delta_rule_chunk(*leaves.values(), chunk=16)
        else:
            first = [leaves[n][:, :, :split] for n in names]
            second = [leaves[n][:, :, split:] for n in names]
            o1, mid = delta_rule_chunk(*first, leaves["initial_state"], chunk=16)
            o2, final = delta_rule_chunk(*second, mid, chunk=16)
            o = torch.cat([o1, o2], dim=2)
        loss = (o.double() * case.grad_o).sum() + (final.double() * case.grad_final).sum()
        return o, final, torch.autograd.grad(loss, list(leaves.values()))

    whole = run(None)
    for split in (41, 64):  # inside a chunk and on a chunk boundary
        pieces = run(split)
        torch.testing.assert_close(pieces[0], whole[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pieces[1], whole[1], rtol=1e-5, atol=1e-5)
        for got, want in zip(pieces[2], whole[2]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["o", "final"])
def test_gradient_of_only_one_output(which, make_delta_case):
    # Autograd hands the backward a zero tensor for an unused output; both cases must work.
    case = make_delta_case(1, 2, 40, 8, 8, mode="moderate")
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.inputs().items()}
    refs = {k: v.double().requires_grad_(True) for k, v in case.inputs().items()}
    out = dict(zip(("o", "final"), delta_rule_chunk(*leaves.values(), chunk=16)))
    out_ref = dict(zip(("o", "final"), delta_rule_reference(*refs.values())))
    grads = torch.autograd.grad(out[which].sum(), list(leaves.values()))
    # The final state does not depend on q: the reference's graph leaves it out (None), ours gives zeros.
    grads_ref = torch.autograd.grad(out_ref[which].sum(), list(refs.values()), allow_unused=True)
    for got, want, leaf in zip(grads, grads_ref, refs.values()):
        want = torch.zeros_like(leaf) if want is None else want
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_autograd_through_the_forward_agrees(make_delta_case):
    # The alternative backward that was measured against the hand-written one (chunk.py docstring).
    case = make_delta_case(1, 2, 40, 8, 8, mode="mixed")
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.inputs().items()}
    o, final, _ = chunk_forward(*leaves.values(), chunk=16)
    loss = (o.double() * case.grad_o).sum() + (final.double() * case.grad_final).sum()
    autograd_grads = torch.autograd.grad(loss, list(leaves.values()))
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.inputs().items()}
    o, final = delta_rule_chunk(*leaves.values(), chunk=16)
    loss = (o.double() * case.grad_o).sum() + (final.double() * case.grad_final).sum()
    for got, want in zip(torch.autograd.grad(loss, list(leaves.values())), autograd_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_saved_for_backward_is_inputs_plus_chunk_states(make_delta_case):
    # Activation memory: the inputs and one [Dk, Dv] state per chunk, nothing of size T * Dk * Dv.
    B, H, T, Dk, Dv, chunk = 2, 2, 256, 16, 16, 32
    case = make_delta_case(B, H, T, Dk, Dv, mode="moderate")
    leaves = [t.clone().requires_grad_(True) for t in case.inputs().values()]
    o, _ = delta_rule_chunk(*leaves, chunk=chunk)
    saved = sum(t.numel() for t in o.grad_fn.saved_tensors if t is not None)
    inputs = sum(t.numel() for t in leaves)
    assert saved == inputs + B * H * (T // chunk) * Dk * Dv, (saved, inputs)
