"""Benchmark: step time of 2-worker ZeRO-2 and ZeRO-2 + CPU offload against single-process training
of the same model and global batch, and the restart time after a killed worker.

    python -m benchmarks.cluster [--steps 20] [--seq-len 64] [--model tiny]

Step times are medians over the steps after the first two (warm-up). The single-process baseline
is mmrec's own pieces (prepare_stage, AdamW, lm_loss) with no Ray and no DeepSpeed, using all CPUs
the workers share. Restart time runs from the moment the killed worker announced its death (the fault
hook's marker file) to the end of the first training step after the restart: worker-group restart,
DeepSpeed init, checkpoint load and one step. Numbers are noisy on a loaded machine; the table says
what ran.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cluster.config import JobConfig
from cluster.job import run_stage
from cluster.synthetic_data import write_synthetic_dataset


def _median_step(seconds: list[float]) -> float:
    return statistics.median(seconds[2:] if len(seconds) > 4 else seconds)


def single_process(manifest: str, job: JobConfig, steps: int) -> float:
    from mmrec.data import ShardLoader
    from mmrec.train import build_scheduler, lm_loss, prepare_stage

    torch.set_num_threads(job.scaling.num_workers)
    setup = prepare_stage("stage1", job.model_config(), job.train)
    optimizer = torch.optim.AdamW(setup.param_groups, lr=job.train.lr, betas=job.train.betas, weight_decay=job.train.weight_decay)
    scheduler = build_scheduler(optimizer, job.train)
    loader = ShardLoader(manifest, ("text", "code"), micro_batch_size=job.global_batch_size, seed=job.data.seed)
    data, seconds = iter(loader), []
    for _ in range(steps):
        started = time.perf_counter()
        tokens = next(data)["tokens"]  # [global_batch, seq_len + 1]
        loss, _ = lm_loss(setup.forward(tokens[:, :-1]), tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), job.train.grad_clip)
        optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - started)
    loader.close()
    return _median_step(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="mmrec-cluster-bench-"))
    manifest = write_synthetic_dataset(work / "data", seq_len=args.seq_len, train_samples=512, val_samples=8)

    def job(name: str, **sections) -> JobConfig:
        values = {
            "stage": "stage1", "model": args.model,
            "train": dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch, max_steps=args.steps, warmup_steps=2,
                          eval_every=0, checkpoint_every=0, log_every=10**6),
            "zero": dict(stage=2), "scaling": dict(num_workers=2, cpus_per_worker=1.0),
            "data": dict(manifest=manifest), "run": dict(storage_path=str(work / "runs"), name=name, metrics=False),
        }
        for section, changes in sections.items():
            values[section] = {**values.get(section, {}), **changes}
        return JobConfig.from_dict(values)

    base_job = job("unused")
    print(f"model {args.model}, seq_len {args.seq_len}, global batch {base_job.global_batch_size}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs; step time = median after 2 warm-up steps", flush=True)
    rows = [("single process, torch AdamW (no Ray, no DeepSpeed)", 1, single_process(manifest, base_job, args.steps))]
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # our own instance, never a cluster found in /tmp/ray
    try:
        for label, name, zero in (
            ("2 workers, ZeRO-2", "zero2", {"stage": 2}),
            ("2 workers, ZeRO-2 + CPU optimizer offload", "zero2-offload", {"stage": 2, "offload_optimizer": True}),
        ):
            history = run_stage(job(name, zero=zero)).history()
            rows.append((label, 2, _median_step([h["step_seconds"] for h in history])))
        kill_step = max(4, args.steps // 2)
        restarted = run_stage(job("restart", train={"checkpoint_every": kill_step - 1, "max_steps": kill_step + 2},
                                  fault={"kill_at_step": kill_step}))
        marker = work / "runs" / "restart" / "injected_faults" / f"kill-step{kill_step}"
        first_after = next(h for h in restarted.history() if h["step"] == kill_step)
        restart_seconds = first_after["finished_at"] - marker.stat().st_mtime
    finally:
        ray.shutdown()

    tokens = base_job.global_batch_size * args.seq_len
    baseline = rows[0][2]
    print()
    print(f"| {'configuration':52s} | workers | step (s) | tokens/s | vs single process |")
    print(f"|{'-' * 54}|---------|----------|----------|-------------------|")
    for label, workers, seconds in rows:
        print(f"| {label:52s} | {workers:7d} | {seconds:8.3f} | {tokens / seconds:8,.0f} | {baseline / seconds:16.2f}x |")
    print()
    print(f"restart after a killed worker (SIGKILL at step {kill_step}, checkpoint at step {kill_step - 1}): "
          f"{restart_seconds:.1f} s from the failure to the end of the first step after it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
