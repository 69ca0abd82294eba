"""The short convolution + SiLU (kernels.short_conv): the fused C kernel and the torch path against the
float64 step-by-step reference, on fresh random inputs, with the C kernel's outputs poisoned with NaN
before it writes them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.conv import fused_cpu, short_conv_reference, short_conv_shifted

REPO = Path(__file__).resolve().parents[2]
# (B, T, C, K): T shorter than the tail, C not a multiple of the kernel's 64-channel blocks, K = 1
SHAPES = [(1, 1, 5, 4), (2, 3, 70, 4), (2, 37, 130, 4), (3, 50, 64, 1), (1, 20, 16, 3), (2, 129, 200, 5)]
# (channels, group) normalised, per shape: none, groups smaller than, equal to and larger than a block
NORMALIZE = {(1, 1, 5, 4): (4, 2), (2, 3, 70, 4): (64, 16), (2, 37, 130, 4): (128, 64), (3, 50, 64, 1): (0, 1),
             (1, 20, 16, 3): (16, 16), (2, 129, 200, 5): (128, 128)}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _inputs(B, T, C, K, with_tail: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, T, C + 7, generator=g)  # x is a strided view, as the block's split of its projection
    x = wide[..., 3 : 3 + C]
    weight = torch.randn(C, K, generator=g) / K**0.5
    tail = torch.randn(B, K - 1, C, generator=g) if with_tail else None
    return x, weight, tail


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = fused_cpu.available()
    assert ok, f"the fused CPU kernel must build on this machine (it has a C compiler): {why}"


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("with_tail", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_forward_and_backward_match_float64_reference(shape, with_tail, threads, normalized):
    B, T, C, K = shape
    normalize = NORMALIZE[shape] if normalized else (0, 1)
    x, weight, tail = _inputs(B, T, C, K, with_tail, seed=hash((shape, with_tail, threads, normalized)) % 2**31)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight_kc = weight.t().contiguous()
        y = torch.full((B, T, C), float("nan"))
        fused_cpu.forward_into(x, weight_kc, tail, y, normalize)
        grad_y = torch.randn(B, T, C)
        grad_x = torch.full((B, T, C), float("nan"))
        grad_tail = torch.full((B, K - 1, C), float("nan")) if with_tail else None
        grad_w = torch.full((K, C), float("nan"))
        fused_cpu.backward_into(x, weight_kc, tail, grad_y, grad_x, grad_tail, grad_w, normalize)
    finally:
        torch.set_num_threads(saved)

    leaves = [t.double().requires_grad_() for t in (x, weight)] + ([tail.double().requires_grad_()] if with_tail else [])
    expected = short_conv_reference(leaves[0], leaves[1], leaves[2] if with_tail else None, normalize)
    expected.backward(grad_y.double())
    for name, got, want in [("y", y, expected), ("grad_x", grad_x, leaves[0].grad), ("grad_weight", grad_w.t(), leaves[1].grad)] + (
        [("grad_tail", grad_tail, leaves[2].grad)] if with_tail else []
    ):
        assert not got.isnan().any(), f"{name}: the kernel left entries unwritten"
        assert _rel(got, want) < 2e-6, f"{name}: relative error {_rel(got, want):.2e}"


def test_dispatch_autograd_and_torch_path_agree_with_reference():
    x, weight, tail = _inputs(2, 45, 96, 4, True, seed=7)
    normalize = (64, 32)
    leaves = [t.clone().requires_grad_() for t in (x, weight, tail)]
    y = kernels.short_conv(*leaves, normalize=normalize)
    assert type(y.grad_fn).__name__ == "ShortConvSiluFunctionBackward"  # fp32 on CPU takes the C kernel
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    shifted_leaves = [t.clone().requires_grad_() for t in (x, weight, tail)]
    y_shifted = short_conv_shifted(*shifted_leaves, normalize)
    (y_shifted * probe).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, tail)]
    y_ref = short_conv_reference(*ref_leaves, normalize)
    (y_ref * probe.double()).sum().backward()
    for got, shifted, ref in zip([y] + [t.grad for t in leaves], [y_shifted] + [t.grad for t in shifted_leaves],
                                 [y_ref] + [t.grad for t in ref_leaves]):
        assert _rel(got, ref) < 2e-6 and _rel(shifted, ref) < 2e-6
    # Other dtypes take the torch path; float64 stays float64 and matches the reference to rounding.
    y64 = kernels.short_conv(x.double(), weight.double(), tail.double(), normalize=normalize)
    assert y64.dtype == torch.float64 and _rel(y64, y_ref) < 1e-12
    assert kernels.short_conv(x.bfloat16(), weight.bfloat16(), None).dtype == torch.bfloat16


def test_normalisation_of_a_zero_group_follows_f_normalize():
    """A group whose silu output is all zeros: F.normalize divides by eps (output 0, gradient gout / eps)."""
    x = torch.zeros(1, 6, 8)
    x[0, :, 4:] = torch.randn(6, 4)
    weight = torch.randn(8, 2)
    leaf, ref_leaf = x.clone().requires_grad_(), x.double().requires_grad_()
    y = kernels.short_conv(leaf, weight, normalize=(8, 4))
    y_ref = short_conv_reference(ref_leaf, weight.double(), None, (8, 4))
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (y_ref * probe.double()).sum().backward()
    assert torch.equal(y[..., :4], torch.zeros(1, 6, 4)) and _rel(y, y_ref) < 2e-6
    assert _rel(leaf.grad, ref_leaf.grad) < 2e-6


def test_nan_propagates_and_large_inputs_saturate():
    x, weight, _ = _inputs(1, 30, 64, 4, False, seed=3)
    x = x.contiguous()
    x[0, 10, 5] = float("nan")
    y = kernels.short_conv(x, weight)
    # A NaN input poisons exactly the K outputs that read it (a NaN loss must not be hidden by the kernel).
    assert y[0, 10:14, 5].isnan().all() and not y[0, :10].isnan().any() and not y[0, 14:].isnan().any()
    big = torch.full((1, 8, 64), 200.0)
    ones = torch.ones(64, 1)
    assert torch.equal(kernels.short_conv(big, ones), big)  # silu(200) = 200
    tiny = kernels.short_conv(-big, ones)
    assert tiny.abs().max() == 0.0 and not tiny.isnan().any()  # silu(-200) underflows to (-)0, never NaN
    leaf = (-big).requires_grad_()
    kernels.short_conv(leaf, ones).sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_bad_inputs_are_named():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[C, K\]"):
        kernels.short_conv(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"tail must be None or a tensor of shape \[B, K-1, C\]"):
        kernels.short_conv(x, torch.randn(8, 4), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.short_conv(x, torch.randn(8, 4), backend="cuda")
    with pytest.raises(ValueError, match="backend='fused_cpu' takes fp32 CPU tensors"):
        kernels.short_conv(x.double(), torch.randn(8, 4).double(), backend="fused_cpu")
    with pytest.raises(ValueError, match=r"normalize must be \(channels, group\)"):
        kernels.short_conv(x, torch.randn(8, 4), normalize=(6, 4))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T >= 1, C\]"):
        kernels.short_conv(torch.randn(2, 0, 8), torch.randn(8, 4))


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_without_a_compiler_one_warning_and_the_torch_path(tmp_path):
    code = (
        "import logging, torch, kernels\n"
        "from kernels.conv import short_conv_shifted\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "x, w = torch.randn(2, 9, 16), torch.randn(16, 4)\n"
        "for _ in range(3): y = kernels.short_conv(x, w)\n"
        "assert y.grad_fn is None and torch.equal(y, short_conv_shifted(x, w, None))\n"
        "print('same as the torch path')\n"
        "try: kernels.short_conv(x, w, backend='fused_cpu')\n"
        "except RuntimeError as error: print('forced:', error)\n"
    )
    done = _run(code, {"CC": "/nonexistent/cc", "MMREC_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "same as the torch path" in done.stdout
    assert "forced: short_conv: the C kernel short_conv.c could not be built: no C compiler" in done.stdout
    assert done.stderr.count("could not be built") == 1 and "/nonexistent/cc" in done.stderr
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_processes_building_at_once_share_one_library(tmp_path):
    code = "from kernels.conv import fused_cpu; ok, why = fused_cpu.available(); assert ok, why; print('built')"
    env = {**os.environ, "MMREC_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all("built" in out for out in outputs)
    files = sorted(f.name for f in (tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].startswith("short_conv-") and files[0].endswith(".so"), files  # no temp left


def test_empty_batch():
    leaf = torch.randn(0, 5, 8, requires_grad=True)
    y = kernels.short_conv(leaf, torch.randn(8, 4), backend="fused_cpu")
    y.sum().backward()
    assert y.shape == (0, 5, 8) and leaf.grad.shape == (0, 5, 8)
