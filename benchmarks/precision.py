"""bf16 against fp32 training on this CPU: tokens/s, MFU and the loss curves' gap, ours vs ours.

    python -m benchmarks.precision [--models small base] [--steps 200] [--seq-len 512] [--batch 4]

Each model trains twice from the same initial weights on the same batches of the demo corpus
(prepared once by datasets_prep on a local Ray instance), through the project's one loop in one
process: train.precision = fp32, then bf16 (torch.autocast with fp32 weights, optimizer state and
accumulation). Printed per model: median tokens/s after 5 warm-up steps, MFU against the
measured peak of the dtype in use (a GEMM; bf16 and fp32 peaks differ), the final training loss
of each (mean of the last 10 steps), the largest relative gap of the two smoothed curves, and the
speedup. `base` is the seed plan's expert shape (D 256, L 12, ffn 1024).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from core.config import resolve


def _curve(records: list[dict], window: int = 10) -> list[float]:
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    return [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "base"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--demo-mb", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)

    import ray
    import torch

    from datasets_prep.pipeline import prepare
    from mmrec.train import Trainer
    from mmrec.train.hardware import cpu_model, native_bf16
    from mmrec.train.records import read_records

    if args.threads:
        torch.set_num_threads(args.threads)
    has_bf16, why = native_bf16(torch.device("cpu"))
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; native bf16: {has_bf16} ({why})")
    work = tempfile.mkdtemp(prefix="mmrec-precision-")
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    try:
        manifest = prepare(f"demo?max_mb={args.demo_mb}", out=f"{work}/data", vocab_size=8192, seq_len=args.seq_len,
                           progress=False)
    finally:
        ray.shutdown()
    rows = []
    for model in args.models:
        runs = {}
        for precision in ("fp32", "bf16"):
            cfg = resolve({"model": {"name": model},
                           "train": dict(seq_len=args.seq_len, micro_batch_size=args.batch, max_steps=args.steps,
                                         warmup_steps=max(1, args.steps // 10), lr=args.lr, precision=precision,
                                         eval_every=0, checkpoint_every=0, log_every=1),
                           "data": {"manifest": manifest},
                           "run": {"storage_path": f"{work}/runs", "name": f"{model}-{precision}", "plots": False}},
                          stage="stage1")
            result = Trainer(cfg).fit()
            records = [r for r in read_records(result.run_url) if r["kind"] == "train"]
            runs[precision] = dict(
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in records[5:]),
                mfu=statistics.median(r["mfu"] for r in records[5:]),
                final=statistics.fmean(r["loss"] for r in records[-10:]),
                curve=_curve(records),
            )
            print(f"  {model} {precision}: {runs[precision]['tokens_per_s']:,.0f} tok/s, "
                  f"MFU {runs[precision]['mfu']:.1%}, final loss {runs[precision]['final']:.4f}", flush=True)
        fp32, bf16 = runs["fp32"], runs["bf16"]
        gap = max(abs(a - b) / a for a, b in zip(fp32["curve"], bf16["curve"]))
        rows.append((model, fp32, bf16, gap))
    print()
    print(f"{args.steps} steps, batch {args.batch} x {args.seq_len} tokens, AdamW lr {args.lr}; demo corpus")
    print("| model | fp32 tok/s | fp32 MFU | bf16 tok/s | bf16 MFU | bf16 / fp32 | final loss fp32 | final loss bf16 | "
          "final gap | max curve gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, fp32, bf16, gap in rows:
        print(f"| {model} | {fp32['tokens_per_s']:,.0f} | {fp32['mfu']:.1%} | {bf16['tokens_per_s']:,.0f} | "
              f"{bf16['mfu']:.1%} | {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x | {fp32['final']:.4f} | "
              f"{bf16['final']:.4f} | {abs(bf16['final'] - fp32['final']) / fp32['final']:.2%} | {gap:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
