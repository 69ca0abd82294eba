"""`python -m benchmarks.train`: what the loop's bookkeeping costs, measured against bare PyTorch.

Two rows, each ours vs a baseline in the same run:
  train step   Trainer._train_step (the fault hook, timers, the schedule, clipping, the one host sync of
               loss and grad norm) vs a hand-written forward/backward/AdamW step on the same model,
               batch and initial weights
  checkpoint   Trainer._save_checkpoint (engine state, RNG, the latest export, run.json, completion
               marker with sha256, atomic publish) vs one plain torch.save of model and optimizer
Medians of repetitions taken in turns (ours, baseline, ours, ...); still noisy on a loaded machine.
The data is the demo corpus, prepared once by datasets_prep on a local Ray instance.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from core.config import resolve
from mmrec.train import Trainer, lm_loss, prepare_stage


def _median_seconds(ours, baseline, repeats: int) -> tuple[float, float]:
    """Medians of `ours` and `baseline`, run in turns so that changing machine load hits both alike."""
    ours(), baseline()  # warm-up: allocator, autograd graph caches
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (baseline, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    import ray

    from datasets_prep.pipeline import prepare

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
        try:
            manifest = prepare("demo?max_mb=1", out=f"{tmp}/data", vocab_size=1024, seq_len=args.seq_len, progress=False)
        finally:
            ray.shutdown()
        cfg = resolve({"model": {"name": args.model},
                       "train": dict(lr=1e-3, warmup_steps=0, max_steps=10_000, seq_len=args.seq_len,
                                     micro_batch_size=args.batch, precision="fp32", eval_every=0),
                       "data": {"manifest": manifest}, "run": {"storage_path": f"{tmp}/runs", "plots": False}},
                      stage="stage1")
        trainer = Trainer(cfg)
        trainer._start(None)
        data = iter(trainer.loader)
        tokens = next(data)["tokens"]
        bare = prepare_stage("stage1", trainer.model_cfg, cfg.train).model
        optimizer = torch.optim.AdamW(bare.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay)

        def bare_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = lm_loss(bare(tokens[:, :-1])[0], tokens)
            loss.backward()
            optimizer.step()

        ours_step, base_step = _median_seconds(lambda: trainer._train_step(data, False), bare_step, args.repeats)

        def ours_checkpoint() -> None:
            trainer.step += 1
            trainer._save_checkpoint({}, None)

        ours_ckpt, base_ckpt = _median_seconds(
            ours_checkpoint,
            lambda: torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "plain.pt"),
            args.repeats,
        )

    tokens_per_step = args.batch * args.seq_len
    print(f"model={args.model} batch={args.batch} seq_len={args.seq_len} repeats={args.repeats} (median)")
    print(f"{'what':<12} {'ours':>12} {'baseline':>12} {'ours/baseline':>14}   baseline")
    print(f"{'train step':<12} {ours_step * 1e3:>10.1f}ms {base_step * 1e3:>10.1f}ms {ours_step / base_step:>14.2f}"
          f"   bare fwd/bwd/AdamW ({tokens_per_step / ours_step:,.0f} vs {tokens_per_step / base_step:,.0f} tok/s)")
    print(f"{'checkpoint':<12} {ours_ckpt * 1e3:>10.1f}ms {base_ckpt * 1e3:>10.1f}ms {ours_ckpt / base_ckpt:>14.2f}"
          f"   one torch.save of model + optimizer, no export/fsync/hash/rename")


if __name__ == "__main__":
    main()
