"""Fixtures for the scan tests: seeded random inputs and a comparison against the float64 reference."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from kernels.scan.reference import scan_reference

DECAY_MODES = ("moderate", "strong", "weak", "mixed")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the norm keeps tiny entries from dominating)."""
    expected = expected.double()
    diff = (actual.double() - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


def make_log_a(shape, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Log decays in [-20, 0]: moderate (-1, 0], strong ~ -20, weak ~ 0 (some exactly 0), or a mix."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    weak = torch.where(u < 0.1, torch.zeros_like(u), -1e-4 * u)
    return _by_mode(mode, DECAY_MODES, shape, generator, moderate=-u, strong=-20.0 + 0.5 * u, weak=weak)


def _by_mode(mode: str, modes: tuple[str, ...], shape, generator: torch.Generator, **candidates: torch.Tensor) -> torch.Tensor:
    """One of the candidates by name, or with mode "mixed" a per-element pick of strong, weak and moderate."""
    if mode in candidates:
        return candidates[mode]
    if mode == "mixed":
        pick = torch.randint(0, 3, shape, generator=generator)
        return torch.where(pick == 0, candidates["strong"], torch.where(pick == 1, candidates["weak"], candidates["moderate"]))
    raise ValueError(f"unknown mode {mode!r}; choose one of {modes}")


@dataclass
class ScanCase:
    """Inputs (in the dtype under test) and upstream gradients for one comparison."""

    log_a: torch.Tensor  # [B, T, D]
    x: torch.Tensor  # [B, T, D]
    h0: torch.Tensor | None  # [B, D]
    grad_h: torch.Tensor  # [B, T, D] float64
    grad_h_last: torch.Tensor  # [B, D] float64


@pytest.fixture
def generator(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def make_case(generator) -> Callable[..., ScanCase]:
    def make(B, T, D, mode="moderate", with_h0=True, dtype=torch.float32, device="cpu") -> ScanCase:
        log_a = make_log_a((B, T, D), mode, generator)
        x = torch.randn(B, T, D, generator=generator, dtype=torch.float64)
        h0 = torch.randn(B, D, generator=generator, dtype=torch.float64) if with_h0 else None
        grad_h = torch.randn(B, T, D, generator=generator, dtype=torch.float64)
        grad_h_last = torch.randn(B, D, generator=generator, dtype=torch.float64)

        def prepare(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return ScanCase(prepare(log_a), prepare(x), prepare(h0), grad_h.to(device), grad_h_last.to(device))

    return make


@pytest.fixture
def check_against_reference() -> Callable[..., dict[str, float]]:
    """Run `scan_fn` and the float64 reference on the same inputs; assert every output and gradient.

    Returns the relative errors by name so a test can add its own assertions.
    """

    def check(scan_fn, case: ScanCase, tolerance: float) -> dict[str, float]:
        inputs = {"log_a": case.log_a, "x": case.x} | ({"h0": case.h0} if case.h0 is not None else {})
        ours = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        ref = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}

        h, h_last = scan_fn(ours["log_a"], ours["x"], ours.get("h0"))
        assert h.dtype == case.x.dtype and h_last.dtype == case.x.dtype
        assert h.shape == case.x.shape and h_last.shape == (case.x.shape[0], case.x.shape[2])
        loss = (h.double() * case.grad_h).sum() + (h_last.double() * case.grad_h_last).sum()
        grads = torch.autograd.grad(loss, list(ours.values()))

        h_ref, h_last_ref = scan_reference(ref["log_a"], ref["x"], ref.get("h0"))
        loss_ref = (h_ref * case.grad_h).sum() + (h_last_ref * case.grad_h_last).sum()
        grads_ref = torch.autograd.grad(loss_ref, list(ref.values()))

        results = {"h": (h, h_ref), "h_last": (h_last, h_last_ref)}
        results |= {f"d{name}": pair for name, pair in zip(ours, zip(grads, grads_ref))}
        errors = {}
        for name, (actual, expected) in results.items():
            assert torch.isfinite(actual).all(), f"{name} has non-finite entries (an unwritten output stays NaN)"
            assert actual.dtype == case.x.dtype, f"{name} is {actual.dtype}, expected {case.x.dtype}"
            errors[name] = relative_error(actual, expected)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tolerance, f"relative errors {errors} exceed {tolerance} (worst: {worst})"
        return errors

    return check


# --- Gated delta rule (kernels.delta) ----------------------------------------------------------

GATE_MODES = ("moderate", "strong", "weak", "mixed")


def make_beta(shape, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Write strengths in [0, 1], paired with make_log_a's modes: strong ~ 1 (some exactly 1),
    weak ~ 0 (some exactly 0), moderate uniform, mixed a per-step pick of the three."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    strong = torch.where(u < 0.1, torch.ones_like(u), 1.0 - 0.01 * u)
    weak = torch.where(u < 0.1, torch.zeros_like(u), 1e-3 * u)
    return _by_mode(mode, GATE_MODES, shape, generator, moderate=u, strong=strong, weak=weak)


@dataclass
class DeltaCase:
    """Inputs (in the dtype under test) and upstream gradients for one delta-rule comparison."""

    q: torch.Tensor  # [B, H, T, Dk]
    k: torch.Tensor  # [B, H, T, Dk]
    v: torch.Tensor  # [B, H, T, Dv]
    log_alpha: torch.Tensor  # [B, H, T]
    beta: torch.Tensor  # [B, H, T]
    initial_state: torch.Tensor | None  # [B, H, Dv, Dk]
    grad_o: torch.Tensor  # [B, H, T, Dv] float64
    grad_final: torch.Tensor  # [B, H, Dv, Dk] float64

    def inputs(self) -> dict[str, torch.Tensor]:
        names = ("q", "k", "v", "log_alpha", "beta") + (("initial_state",) if self.initial_state is not None else ())
        return {name: getattr(self, name) for name in names}


@pytest.fixture
def make_delta_case(generator) -> Callable[..., DeltaCase]:
    def make(
        B, H, T, Dk, Dv, mode="moderate", with_state=True, dtype=torch.float32, state_dtype=None, device="cpu",
        key_norm: float | None = 1.0,  # keys L2-normalised to this norm (as the model does); None: raw randn
    ) -> DeltaCase:
        q = torch.randn(B, H, T, Dk, generator=generator, dtype=torch.float64)
        k = torch.randn(B, H, T, Dk, generator=generator, dtype=torch.float64)
        if key_norm is not None:
            k = key_norm * torch.nn.functional.normalize(k, dim=-1)
        v = torch.randn(B, H, T, Dv, generator=generator, dtype=torch.float64)
        log_alpha = make_log_a((B, H, T), mode, generator)
        beta = make_beta((B, H, T), mode, generator)
        state = torch.randn(B, H, Dv, Dk, generator=generator, dtype=torch.float64) if with_state else None
        grad_o = torch.randn(B, H, T, Dv, generator=generator, dtype=torch.float64)
        grad_final = torch.randn(B, H, Dv, Dk, generator=generator, dtype=torch.float64)

        def prepare(t, to=dtype):
            return None if t is None else t.to(device=device, dtype=to)

        return DeltaCase(
            prepare(q), prepare(k), prepare(v), prepare(log_alpha), prepare(beta), prepare(state, state_dtype or dtype),
            grad_o.to(device), grad_final.to(device),
        )

    return make


@pytest.fixture
def check_delta_against_reference() -> Callable[..., dict[str, float]]:
    """Run `delta_fn(q, k, v, log_alpha, beta, initial_state)` and the float64 reference on the same
    inputs; assert dtypes, shapes, finiteness, and the relative error of o, the final state and the
    gradient of every input. `tolerance` is one number or a dict by name ("o", "final", "dq", ...,
    "dinitial_state"; missing names use tolerance["default"]). Returns the errors by name.
    """
    from kernels.delta.reference import delta_rule_reference

    def check(delta_fn, case: DeltaCase, tolerance) -> dict[str, float]:
        inputs = case.inputs()
        ours = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        ref = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
        B, H, T, Dk = case.q.shape
        Dv = case.v.shape[-1]

        o, final = delta_fn(*[ours.get(name) for name in ("q", "k", "v", "log_alpha", "beta", "initial_state")])
        state_dtype = torch.float64 if case.v.dtype == torch.float64 else torch.float32
        assert o.dtype == case.v.dtype and o.shape == (B, H, T, Dv), (o.dtype, o.shape)
        assert final.dtype == state_dtype and final.shape == (B, H, Dv, Dk), (final.dtype, final.shape)
        loss = (o.double() * case.grad_o).sum() + (final.double() * case.grad_final).sum()
        grads = torch.autograd.grad(loss, list(ours.values()))

        o_ref, final_ref = delta_rule_reference(*[ref.get(n) for n in ("q", "k", "v", "log_alpha", "beta", "initial_state")])
        loss_ref = (o_ref * case.grad_o).sum() + (final_ref * case.grad_final).sum()
        grads_ref = torch.autograd.grad(loss_ref, list(ref.values()))

        results = {"o": (o, o_ref), "final": (final, final_ref)}
        results |= {f"d{name}": pair for name, pair in zip(ours, zip(grads, grads_ref))}
        limits = tolerance if isinstance(tolerance, dict) else {"default": tolerance}
        errors, failed = {}, []
        for name, (actual, expected) in results.items():
            assert torch.isfinite(actual).all(), f"{name} has non-finite entries (an unwritten output stays NaN)"
            if name.startswith("d"):
                wanted = inputs[name[1:]].dtype
                assert actual.dtype == wanted, f"{name} is {actual.dtype}, expected {wanted}"
            errors[name] = relative_error(actual, expected)
            if errors[name] > limits.get(name, limits["default"]):
                failed.append(name)
        assert not failed, f"relative errors {errors} exceed {limits} (failing: {failed})"
        return errors

    return check
