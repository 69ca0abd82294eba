"""`python -m benchmarks.train`: what the Trainer's bookkeeping costs, measured against bare PyTorch.

Two rows, each ours vs a baseline in the same run:
  train step   Trainer.train_step (shape checks, NaN check, clipping, timers, schedule) vs a hand-written
               forward/backward/AdamW step on the same model, batch and initial weights
  checkpoint   save_checkpoint (temp dir, fsync, sha256, rename, latest pointer) vs one plain torch.save
Medians of repetitions taken in turns (ours, baseline, ours, ...); still noisy on a loaded machine.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmrec.train.checkpoint import save_checkpoint
from mmrec.train.config import TrainConfig
from mmrec.train.loss import lm_loss
from mmrec.train.stages import prepare_stage
from mmrec.train.token_stream import TokenStream
from mmrec.train.trainer import Trainer


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
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10_000, seq_len=args.seq_len, micro_batch_size=args.batch)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = dict(tokens=tokens, domains=["text"] * args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare_stage("stage1", args.model, cfg)
        loader = TokenStream({"text": tokens.flatten().numpy()}, seq_len=args.seq_len, local_batch=args.batch)
        trainer = Trainer(setup, cfg, loader, out_dir=tmp, log=lambda _: None)
        bare = prepare_stage("stage1", args.model, cfg).model
        optimizer = torch.optim.AdamW(bare.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

        def bare_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = lm_loss(bare(tokens[:, :-1])[0], tokens)
            loss.backward()
            optimizer.step()

        ours_step, base_step = _median_seconds(lambda: trainer.train_step(iter([batch])), bare_step, args.repeats)

        state = trainer._checkpoint_state()
        steps = iter(range(1, 10_000))
        ours_ckpt, base_ckpt = _median_seconds(
            lambda: save_checkpoint(Path(tmp) / "ckpt", next(steps), state),
            lambda: torch.save(state, Path(tmp) / "plain.pt"),
            args.repeats,
        )

    tokens_per_step = args.batch * args.seq_len
    print(f"model={args.model} batch={args.batch} seq_len={args.seq_len} repeats={args.repeats} (median)")
    print(f"{'what':<12} {'ours':>12} {'baseline':>12} {'ours/baseline':>14}   baseline")
    print(f"{'train step':<12} {ours_step * 1e3:>10.1f}ms {base_step * 1e3:>10.1f}ms {ours_step / base_step:>14.2f}"
          f"   bare fwd/bwd/AdamW ({tokens_per_step / ours_step:,.0f} vs {tokens_per_step / base_step:,.0f} tok/s)")
    print(f"{'checkpoint':<12} {ours_ckpt * 1e3:>10.1f}ms {base_ckpt * 1e3:>10.1f}ms {ours_ckpt / base_ckpt:>14.2f}"
          f"   one torch.save, no fsync/hash/rename")


if __name__ == "__main__":
    main()
