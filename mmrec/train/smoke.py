"""The interim end-to-end job: stage1 -> stage2-text -> stage2-code -> stage3 -> generate, in one
process on a corpus built from files on this machine, with the byte tokenizer and the `tiny` config.

It checks what the pipeline is for: each stage-2 expert must reach a lower validation loss on its
own domain than the stage-1 base it started from (SmokeCheckError otherwise).
"""
from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmrec.train.byte_tokenizer import ByteTokenizer
from mmrec.train.config import TrainConfig
from mmrec.train.export import build_from_export, read_export
from mmrec.train.generate import generate, step_fn_for
from mmrec.train.loss import evaluate
from mmrec.train.smoke_corpus import build_smoke_corpus
from mmrec.train.stages import prepare_stage
from mmrec.train.token_stream import TokenStream
from mmrec.train.trainer import Trainer

SEQ_LEN, MICRO_BATCH, EVAL_BATCHES = 128, 8, 8
BASE_STEPS = {"stage1": 600, "stage2-text": 200, "stage2-code": 200, "stage3": 200}
PEAK_LR = {"stage1": 3e-3, "stage2-text": 1e-3, "stage2-code": 1e-3, "stage3": 3e-3}


class SmokeCheckError(AssertionError):
    """A stage did not do what it is for (e.g. a stage-2 expert did not beat the base on its domain)."""


def _train_config(stage: str, steps_scale: float) -> TrainConfig:
    steps = max(4, round(BASE_STEPS[stage] * steps_scale))
    return TrainConfig.for_stage(
        stage, lr=PEAK_LR[stage], warmup_steps=max(1, steps // 10), max_steps=steps, seq_len=SEQ_LEN,
        micro_batch_size=MICRO_BATCH, eval_every=max(2, steps // 3), eval_batches=EVAL_BATCHES,
        checkpoint_every=max(2, steps // 2), log_every=max(1, steps // 6), weight_decay=0.01,
    )


def run_smoke(
    out_dir: str | Path = "runs/smoke",
    *,
    steps_scale: float = 1.0,
    max_mb: float = 3.0,
    val_fraction: float = 0.05,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict:
    """Run the whole pipeline from scratch in out_dir; returns the validation losses it printed."""
    from mmrec import get_config

    out = Path(out_dir)
    for stage in BASE_STEPS:  # a smoke run always starts from scratch
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    log(f"smoke: building a {max_mb} MB corpus from files on this machine ...")
    tokenizer = ByteTokenizer()
    tokenizer_file = tokenizer.save(out)
    corpus = build_smoke_corpus(max_mb, val_fraction)
    ids = {
        domain: {split: np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) for split, text in splits.items()}
        for domain, splits in corpus.items()
    }
    for domain, splits in ids.items():
        log(f"smoke: {domain}: {len(splits['train']):,} train / {len(splits['val']):,} val tokens")
    model_cfg = get_config("tiny", vocab_size=tokenizer.vocab_size, seq_len=SEQ_LEN)

    def loaders(domains: tuple[str, ...], seed: int) -> tuple[TokenStream, TokenStream]:
        train = TokenStream({d: ids[d]["train"] for d in domains}, seq_len=SEQ_LEN, local_batch=MICRO_BATCH, seed=seed)
        val = TokenStream({d: ids[d]["val"] for d in domains}, seq_len=SEQ_LEN, local_batch=MICRO_BATCH, seed=seed)
        return train, val

    # Per-domain validation batches, identical for every model compared on them.
    val_batches = {d: list(itertools.islice(loaders((d,), seed=0)[1], EVAL_BATCHES)) for d in ("text", "code")}

    def train_stage(stage: str, domains: tuple[str, ...], init_from=None):
        cfg = _train_config(stage, steps_scale)
        log(f"\n=== {stage}: {cfg.max_steps} steps on {'+'.join(domains)} ===")
        setup = prepare_stage(stage, model_cfg, cfg, init_from=init_from)
        train, val = loaders(domains, seed=cfg.seed)
        result = Trainer(setup, cfg, train, val, out_dir=out / stage, tokenizer_file=tokenizer_file, log=log).fit()
        log(f"{stage}: best val_loss {result.best.loss:.4f}, perplexity {result.best.perplexity:.2f} -> {result.best_export}")
        return setup, result

    summary: dict = {}
    base_setup, base = train_stage("stage1", ("text", "code"))
    base_model = build_from_export(read_export(base.best_export))
    base_loss = {d: evaluate(base_model, val_batches[d], lambda x: base_model(x)[0]).loss for d in val_batches}
    summary["stage1"] = base.best.loss
    experts = {}
    for domain in ("text", "code"):
        stage = f"stage2-{domain}"
        setup, result = train_stage(stage, (domain,), init_from=base.best_export)
        expert = build_from_export(read_export(result.best_export))
        own = evaluate(expert, val_batches[domain], lambda x: expert(x)[0]).loss
        log(f"{stage}: {domain} val loss: expert {own:.4f} vs base {base_loss[domain]:.4f} "
            f"({'better' if own < base_loss[domain] else 'NOT better'})")
        summary[stage] = own
        summary[f"base-{domain}"] = base_loss[domain]
        experts[domain] = result.best_export
        if not own < base_loss[domain]:
            raise SmokeCheckError(f"{stage}: expert val loss {own:.4f} is not below the base's {base_loss[domain]:.4f}")
    _, fused = train_stage("stage3", ("text", "code"), init_from=experts)
    summary["stage3"] = fused.best.loss

    model = build_from_export(read_export(fused.final_export))
    log("\n=== generate (stage-3 export, streaming with the recurrent state) ===")
    for prompt, expert in (("def ", "code"), ("The ", "text"), ("import ", None)):
        new = generate(step_fn_for(model, expert), tokenizer.encode(prompt), 60, temperature=0.8, top_k=20, seed=0)
        log(f"[{expert or 'fused'}] {prompt!r} -> {tokenizer.decode(new)!r}")
    log("\nsmoke: validation perplexity per stage: " + ", ".join(
        f"{k} {np.exp(summary[k]):.2f}" for k in ("stage1", "stage2-text", "stage2-code", "stage3")))
    return summary
