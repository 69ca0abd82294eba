"""Benchmark: step time of the one loop on 2 DeepSpeed workers (ZeRO-2, ZeRO-2 + CPU optimizer offload)
against the same loop in one process (torch engine) at the same model and global batch, and the restart
time after a killed worker.

    python -m benchmarks.cluster [--steps 20] [--seq-len 64] [--model tiny]

The data is the demo corpus prepared by datasets_prep on the benchmark's own local Ray instance. Step
times are medians over the steps after the first two (warm-up), read from each run's metrics.jsonl.
The single process uses as many threads as the workers have CPUs together. Restart time runs from
the moment the killed worker announced its death (the fault hook's marker) to the end of the first
training step after the restart: worker-group restart, DeepSpeed init, checkpoint load and one step.
Numbers are noisy on a loaded machine; the table says what ran.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from core.config import resolve


def _median_step(records: list[dict]) -> float:
    seconds = [r["step_seconds"] for r in records if r["kind"] == "train"]
    return statistics.median(seconds[2:] if len(seconds) > 4 else seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    args = parser.parse_args(argv)

    import ray

    from cluster import run_stage
    from datasets_prep.pipeline import prepare
    from mmrec.train import Trainer
    from mmrec.train.records import read_records

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="mmrec-cluster-bench-"))
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)  # never a stale cluster
    try:
        manifest = prepare("demo?max_mb=2", out=str(work / "data"), vocab_size=1024, seq_len=args.seq_len, progress=False)

        def config(name: str, **sections):
            values = {
                "model": {"name": args.model},
                "train": dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch, max_steps=args.steps, warmup_steps=2,
                              eval_every=0, checkpoint_every=0, log_every=1, precision=args.precision),
                "engine": dict(kind="deepspeed", zero_stage=2), "scaling": dict(num_workers=2, cpus_per_worker=1.0),
                "data": dict(manifest=manifest), "run": dict(storage_path=str(work / "runs"), name=name, plots=False),
            }
            for section, changes in sections.items():
                values[section] = {**values.get(section, {}), **changes}
            return resolve(values, stage="stage1")

        torch.set_num_threads(2)
        single = Trainer(config("single", engine={"kind": "torch", "zero_stage": 0}, scaling={"num_workers": 1},
                                train={"grad_accum_steps": 2})).fit()
        rows = [("one process, torch engine (micro x 2 accumulation)", 1, _median_step(read_records(single.run_url)))]
        for label, name, engine in (
            ("2 workers, DeepSpeed ZeRO-2", "zero2", {"zero_stage": 2}),
            ("2 workers, DeepSpeed ZeRO-2 + CPU optimizer offload", "zero2-offload",
             {"zero_stage": 2, "offload_optimizer": True}),
        ):
            result = run_stage(config(name, engine=engine))
            rows.append((label, 2, _median_step(read_records(result.run_url))))
        kill_step = max(4, args.steps // 2)
        restarted = run_stage(config("restart", train={"checkpoint_every": kill_step - 1, "max_steps": kill_step + 2},
                                     fault={"kill_at_step": kill_step}))
        marker = work / "runs" / "restart" / "injected_faults" / f"kill-step{kill_step}"
        first_after = next(r for r in read_records(restarted.run_url) if r["kind"] == "train" and r["step"] == kill_step)
        restart_seconds = first_after["time"] - marker.stat().st_mtime
    finally:
        ray.shutdown()

    tokens = args.micro_batch * 2 * args.seq_len
    baseline = rows[0][2]
    print(f"model {args.model}, seq_len {args.seq_len}, global batch {args.micro_batch * 2}, {args.steps} steps, "
          f"{args.precision}, {os.cpu_count()} CPUs; step time = median after 2 warm-up steps")
    print()
    print(f"| {'configuration':52s} | workers | step (s) | tokens/s | vs one process |")
    print(f"|{'-' * 54}|---------|----------|----------|----------------|")
    for label, workers, seconds in rows:
        print(f"| {label:52s} | {workers:7d} | {seconds:8.3f} | {tokens / seconds:8,.0f} | {baseline / seconds:13.2f}x |")
    print()
    print(f"restart after a killed worker (SIGKILL at step {kill_step}, checkpoint at step {kill_step - 1}): "
          f"{restart_seconds:.1f} s from the failure to the end of the first step after it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
