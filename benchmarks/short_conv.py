"""The short convolution + SiLU (+ the L2 norm of q and k per head, as the block runs it), forward +
backward: the fused C kernel (kernels/conv/short_conv.c) against the same op in torch ops
(kernels.conv.shifted followed by F.normalize), in one run.

    python -m benchmarks.short_conv [--lengths 2048 16384] [--channels 768] [--group 64] [--threads 1]

x is a strided view of a wider projection, as in the block ([B, T, C + D + 2H] split); the
normalised channels are the first 2/3 (q and k) in groups of --group. Median of --repeats after a
warm-up; speedup = torch / C.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._harness import print_table
from kernels.conv import fused_cpu, short_conv_shifted
from mmrec.train.hardware import keep_freed_memory


def _median_s(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--channels", type=int, default=768, help="C: q, k, v of d_model 256 (default 768)")
    parser.add_argument("--group", type=int, default=64, help="head size of the normalised groups (default 64)")
    parser.add_argument("--taps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.channels % 3 or (2 * args.channels // 3) % args.group:
        parser.error("--channels must be 3 D with 2 D a multiple of --group")
    if args.threads:
        torch.set_num_threads(args.threads)
    built, why = fused_cpu.available()
    if not built:
        raise SystemExit(f"benchmarks.short_conv: the C kernel could not be built: {why}")
    keep_freed_memory()
    C, normalize = args.channels, (2 * args.channels // 3, args.group)
    rows = []
    for T in args.lengths:
        generator = torch.Generator().manual_seed(0)
        wide = torch.randn(1, T, C + 264, generator=generator)
        weight = torch.randn(C, args.taps, generator=generator) / args.taps**0.5
        grad = torch.randn(1, T, C, generator=generator)
        results = {}
        for name, op in (("C kernel", fused_cpu.short_conv_fused_cpu), ("torch ops", short_conv_shifted)):
            def step(op=op):
                x = wide[..., :C].detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)
                op(x, w, None, normalize).backward(grad)
            results[name] = _median_s(step, args.repeats)
        rows.append([str(T), f"{results['C kernel'] * 1e3:.1f}", f"{results['torch ops'] * 1e3:.1f}",
                     f"{results['torch ops'] / results['C kernel']:.1f}x"])
        print(f"T {T}: C {results['C kernel'] * 1e3:.1f} ms, torch {results['torch ops'] * 1e3:.1f} ms", flush=True)
    print(f"\nshort conv (K {args.taps}) + SiLU + L2 norm of {normalize[0]} of {C} channels in groups of {args.group}, "
          f"forward + backward, batch 1, {torch.get_num_threads()} torch threads")
    print_table(["T", "C kernel ms", "torch ops ms", "speedup"], rows)


if __name__ == "__main__":
    main()
