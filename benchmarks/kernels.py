"""Kernel benchmarks: `python -m benchmarks.kernels [--op scan|delta|all] [--shapes 8x2048x256,...]
[--delta-shapes 8x4x2048x64,...] [--repeats N] [--skip-loop] [--device cpu|cuda|all]`.

Prints one table per op and device. Every row times ours against a baseline in the same run:

    scan   cpu   chunked PyTorch scan          vs  a Python loop over x.unbind(1) with autograd
    scan   cuda  Triton kernels                vs  the chunked PyTorch scan run on the GPU, and the loop
    delta  cpu   fused recurrent C kernel      vs  the chunk-parallel PyTorch path (chunk 32, the model's old
                                                   CPU path), and the naive per-step loop with autograd (one repeat)
    delta  cuda  Triton kernels                vs  the chunk-parallel PyTorch path on the GPU, and the loop

Delta shapes are BxHxTxD with Dk = Dv = D; keys L2-normalised, log_alpha in [-0.1, 0], beta in
[0, 1]. Its tok/s column is B*T / our time; its minimal bytes are fwd: read q, k, v, log_alpha,
beta, write o and the fp32 chunk states (T/64 of [D, D]); bwd: read those, the states and dL/do,
write dq, dk, dv, dlog_alpha, dbeta.

Times are the median over --repeats after one warm-up. "fwd+bwd" is one forward and one
backward; "bwd" times the backward alone (the forward is run untimed before each repeat).
GB/s counts the bytes a scan must move at least (fwd: read log_a, x, write h; bwd: read
log_a, h, dL/dh, write dlog_a, dx), divided by our time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from kernels.scan.cpu import scan_cpu

DEFAULT_SHAPES = {"cpu": "8x2048x256,2x8192x256,32x512x64", "cuda": "8x8192x2048,8x2048x256"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def loop_scan(log_a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain baseline: one autograd step per time step (fp32 state for half inputs)."""
    a = log_a.float().exp()
    h = torch.zeros_like(a[:, 0])
    steps = []
    for a_t, x_t in zip(a.unbind(1), x.float().unbind(1)):
        h = a_t * h + x_t
        steps.append(h)
    return torch.stack(steps, dim=1).to(x.dtype), h.to(x.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(run: Callable[[], object], before: Callable[[], object], device, repeats: int) -> float:
    """Median wall time of `run` (after `before`, untimed), one warm-up excluded."""
    times = []
    for i in range(repeats + 1):
        state = before()
        _sync(device)
        start = time.perf_counter()
        run(state)
        _sync(device)
        if i:  # the first call compiles and warms caches
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_pass(scan_fn, log_a, x, which: str, repeats: int) -> float:
    device = x.device
    grad_h = torch.randn_like(x)

    def leaves():
        return log_a.detach().requires_grad_(True), x.detach().requires_grad_(True)

    if which == "fwd":
        with torch.no_grad():
            return _median_ms(lambda _: scan_fn(log_a, x), lambda: None, device, repeats)
    if which == "fwd+bwd":

        def forward_backward(inputs):
            h, _ = scan_fn(*inputs)
            h.backward(grad_h)

        return _median_ms(forward_backward, leaves, device, repeats)
    if which == "bwd":

        def forward_only():
            h, _ = scan_fn(*leaves())
            return h

        return _median_ms(lambda h: h.backward(grad_h), forward_only, device, repeats)
    raise ValueError(f"unknown pass {which!r}")


def _min_bytes(which: str, B: int, T: int, D: int, dtype: torch.dtype) -> int:
    tensors = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[which]
    return tensors * B * T * D * torch.empty((), dtype=dtype).element_size()


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxTxD with positive integers, e.g. 8x2048x256")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or ["shape", "dtype", "pass", "ours", "ours ms", "baseline", "baseline ms", "speedup", "ours GB/s"]
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _bench(device, shapes, dtype_name, passes, ours, baselines, repeats) -> list[dict]:
    rows = []
    dtype = DTYPES[dtype_name]
    for B, T, D in shapes:
        generator = torch.Generator().manual_seed(0)
        log_a = (-torch.rand(B, T, D, generator=generator)).to(device, dtype)
        x = torch.randn(B, T, D, generator=generator).to(device, dtype)
        for which in passes:
            ours_name, ours_fn = ours
            ours_ms = _time_pass(ours_fn, log_a, x, which, repeats)
            gbps = _min_bytes(which, B, T, D, dtype) / (ours_ms * 1e-3) / 1e9
            for base_name, base_fn, base_repeats in baselines:
                base_ms = _time_pass(base_fn, log_a, x, which, base_repeats)
                rows.append(
                    {
                        "shape": f"{B}x{T}x{D}", "dtype": dtype_name, "pass": which,
                        "ours": ours_name, "ours ms": f"{ours_ms:.2f}",
                        "baseline": base_name, "baseline ms": f"{base_ms:.2f}",
                        "speedup": f"{base_ms / ours_ms:.1f}x", "ours GB/s": f"{gbps:.1f}",
                    }
                )
                print(f"  {rows[-1]['shape']} {which}: {ours_name} {ours_ms:.2f} ms, {base_name} {base_ms:.2f} ms", flush=True)
    return rows


# --- gated delta rule ----------------------------------------------------------------------------

DELTA_DEFAULT_SHAPES = {"cpu": "8x4x2048x64", "cuda": "8x4x8192x64,8x4x2048x64"}
DELTA_COLUMNS = ["shape", "dtype", "pass", "ours", "ours ms", "ours tok/s", "baseline", "baseline ms", "speedup", "ours GB/s"]


def loop_delta(q, k, v, log_alpha, beta):
    """The naive baseline: one autograd step per time step, fp32 state [B, H, Dv, Dk]."""
    B, H, T, Dk = k.shape
    a = log_alpha.float().exp()
    state = torch.zeros(B, H, v.shape[-1], Dk, device=v.device)
    outs = []
    for t in range(T):
        k_t, a_t, b_t = k[:, :, t].float(), a[:, :, t, None], beta[:, :, t, None].float()
        s_k = (state @ k_t[..., None])[..., 0]  # [B, H, Dv]
        write = b_t * (v[:, :, t].float() - a_t * s_k)
        state = a_t[..., None] * state + write[..., None] * k_t[..., None, :]
        outs.append((state @ q[:, :, t, :, None].float())[..., 0])
    return torch.stack(outs, dim=2).to(v.dtype), state


def _delta_inputs(B, H, T, D, device, dtype):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=generator)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=generator), dim=-1)
    v = torch.randn(B, H, T, D, generator=generator)
    log_alpha = -0.1 * torch.rand(B, H, T, generator=generator)
    beta = torch.rand(B, H, T, generator=generator)
    return [t.to(device, dtype) for t in (q, k, v, log_alpha, beta)]


def _time_delta(delta_fn, inputs, which: str, repeats: int) -> float:
    device = inputs[0].device
    grad_o = torch.randn_like(inputs[2])

    def leaves():
        return [t.detach().requires_grad_(True) for t in inputs]

    if which == "fwd":
        with torch.no_grad():
            return _median_ms(lambda _: delta_fn(*inputs), lambda: None, device, repeats)
    if which == "fwd+bwd":

        def forward_backward(leaf_inputs):
            o, _ = delta_fn(*leaf_inputs)
            o.backward(grad_o)

        return _median_ms(forward_backward, leaves, device, repeats)
    if which == "bwd":

        def forward_only():
            o, _ = delta_fn(*leaves())
            return o

        return _median_ms(lambda o: o.backward(grad_o), forward_only, device, repeats)
    raise ValueError(f"unknown pass {which!r}")


def _delta_min_bytes(which: str, B: int, H: int, T: int, D: int, dtype: torch.dtype, chunk: int = 64) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    per_head = {"fwd": (5 * D + 2) * T * size, "bwd": (6 * D + 4) * T * size}
    per_head = {name: n + -(-T // chunk) * D * D * 4 for name, n in per_head.items()}  # fp32 chunk states
    per_head["fwd+bwd"] = per_head["fwd"] + per_head["bwd"]
    return B * H * per_head[which]


def _parse_delta_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"delta shape {item!r} is not BxHxTxD with positive integers, e.g. 8x4x2048x64")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _bench_delta(device, shapes, dtype_name, passes, ours, baselines, repeats) -> list[dict]:
    rows = []
    dtype = DTYPES[dtype_name]
    for B, H, T, D in shapes:
        inputs = _delta_inputs(B, H, T, D, device, dtype)
        for which in passes:
            ours_name, ours_fn = ours
            ours_ms = _time_delta(ours_fn, inputs, which, repeats)
            gbps = _delta_min_bytes(which, B, H, T, D, dtype) / (ours_ms * 1e-3) / 1e9
            for base_name, base_fn, base_repeats in baselines:
                base_ms = _time_delta(base_fn, inputs, which, base_repeats)
                rows.append(
                    {
                        "shape": f"{B}x{H}x{T}x{D}", "dtype": dtype_name, "pass": which,
                        "ours": ours_name, "ours ms": f"{ours_ms:.1f}", "ours tok/s": f"{B * T / (ours_ms * 1e-3):,.0f}",
                        "baseline": base_name, "baseline ms": f"{base_ms:.1f}",
                        "speedup": f"{base_ms / ours_ms:.1f}x", "ours GB/s": f"{gbps:.1f}",
                    }
                )
                print(f"  {rows[-1]['shape']} {which}: {ours_name} {ours_ms:.1f} ms, {base_name} {base_ms:.1f} ms", flush=True)
    return rows


def _run_delta(args) -> None:
    from kernels.delta.chunk import delta_rule_chunk

    if args.device in ("cpu", "all"):
        from kernels.delta.fused_recurrent import delta_rule_fused_recurrent

        shapes = args.delta_shapes or _parse_delta_shapes(DELTA_DEFAULT_SHAPES["cpu"])
        print(f"\ndelta rule, cpu: {torch.get_num_threads()} torch threads")
        baselines = [("chunk torch (C 32)", lambda *x: delta_rule_chunk(*x, None, 32), args.repeats)]
        if not args.skip_loop:
            baselines.append(("per-step loop", loop_delta, 1))
        rows = _bench_delta(
            torch.device("cpu"), shapes, args.dtype or "fp32", ["fwd", "fwd+bwd"],
            ("fused recurrent C", lambda *x: delta_rule_fused_recurrent(*x, None)), baselines, args.repeats,
        )
        _print_table("CPU: the C kernel vs the chunk path and the per-step loop (speedup = baseline / ours)", rows,
                     DELTA_COLUMNS)
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            if args.device == "cuda":
                raise SystemExit("benchmarks.kernels: --device cuda asked for, but torch sees no CUDA GPU")
            print("\ndelta rule, CUDA: skipped (no CUDA GPU visible to torch)")
            return
        from kernels.delta.triton_delta import delta_rule_triton

        shapes = args.delta_shapes or _parse_delta_shapes(DELTA_DEFAULT_SHAPES["cuda"])
        baselines = [("chunk torch on GPU", delta_rule_chunk, args.repeats)]
        if not args.skip_loop:
            baselines.append(("per-step loop", loop_delta, 1))
        print(f"\ndelta rule, cuda: {torch.cuda.get_device_name()}")
        rows = _bench_delta(
            torch.device("cuda"), shapes, args.dtype or "bf16", ["fwd", "bwd"],
            ("triton", delta_rule_triton), baselines, args.repeats,
        )
        _print_table("CUDA: Triton delta rule vs baselines (speedup = baseline / ours)", rows, DELTA_COLUMNS)


def _run_scan(args) -> None:
    if args.device in ("cpu", "all"):
        shapes = args.shapes or _parse_shapes(DEFAULT_SHAPES["cpu"])
        print(f"cpu: {torch.get_num_threads()} torch threads")
        rows = _bench(
            torch.device("cpu"), shapes, args.dtype or "fp32", ["fwd", "fwd+bwd"],
            ("chunked", scan_cpu), [("unbind loop", loop_scan, args.repeats)], args.repeats,
        )
        _print_table("CPU: chunked PyTorch scan vs a Python loop over x.unbind(1) (speedup = baseline / ours)", rows)

    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            if args.device == "cuda":
                raise SystemExit("benchmarks.kernels: --device cuda asked for, but torch sees no CUDA GPU")
            print("\nCUDA: skipped (no CUDA GPU visible to torch)")
            return
        from kernels.scan.triton_scan import scan_triton

        shapes = args.shapes or _parse_shapes(DEFAULT_SHAPES["cuda"])
        baselines = [("chunked torch on GPU", scan_cpu, args.repeats)]
        if not args.skip_loop:
            baselines.append(("unbind loop", loop_scan, 1))
        print(f"\ncuda: {torch.cuda.get_device_name()}")
        rows = _bench(
            torch.device("cuda"), shapes, args.dtype or "bf16", ["fwd", "bwd"],
            ("triton", scan_triton), baselines, args.repeats,
        )
        _print_table("CUDA: Triton scan vs baselines (speedup = baseline / ours)", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_parse_shapes, help="comma-separated BxTxD for the scan (default per device: %s)" % DEFAULT_SHAPES)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median is shown)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="which tables to print")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the (slow) per-step loop baselines of the delta rule and of the CUDA scan")
    parser.add_argument("--op", choices=["scan", "delta", "all"], default="all", help="which op to benchmark")
    parser.add_argument(
        "--delta-shapes", type=_parse_delta_shapes,
        help="comma-separated BxHxTxD for the delta rule (default per device: %s)" % DELTA_DEFAULT_SHAPES,
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    if args.op in ("scan", "all"):
        _run_scan(args)
    if args.op in ("delta", "all"):
        _run_delta(args)


if __name__ == "__main__":
    main()
