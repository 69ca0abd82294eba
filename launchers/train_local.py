"""`python -m launchers.train_local --stage STAGE --data MANIFEST --out DIR [--model tiny] [--init-from EXPORT]
[--init-text EXPORT --init-code EXPORT] [--set key=value ...]`

One stage on one machine without Ray or DeepSpeed: the single-process Trainer over a prepared dataset
(datasets_prep manifest, path or s3://). Resumes from DIR/checkpoints when they exist. Writes
DIR/best and DIR/final exports with the dataset's tokenizer beside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import storage
from core.manifest import load_manifest, manifest_dir
from mmrec import get_config
from mmrec.data import ShardLoader
from mmrec.train import STAGES, ConfigError, Trainer, TrainConfig, prepare_stage

STAGE_DOMAINS = {"stage1": ("text", "code"), "stage2-text": ("text",), "stage2-code": ("code",), "stage3": ("text", "code")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--data", required=True, help="manifest.json of a prepared dataset (path or s3://)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints/, best/, final/)")
    parser.add_argument("--model", default="tiny", help="model config name (vocab_size comes from the dataset)")
    parser.add_argument("--init-from", help="stage1: optional export to continue; stage2-*: the stage-1 export")
    parser.add_argument("--init-text", help="stage3: the stage2-text export")
    parser.add_argument("--init-code", help="stage3: the stage2-code export")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override, e.g. --set lr=1e-4 --set max_steps=200 (repeatable)")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.data)
    try:
        cfg = TrainConfig.for_stage(args.stage, seq_len=manifest.seq_len).override(*args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if cfg.seq_len != manifest.seq_len:
        parser.error(f"seq_len={cfg.seq_len} but {args.data} holds samples of seq_len {manifest.seq_len}; drop the override")
    if args.stage == "stage3":
        if not (args.init_text and args.init_code):
            parser.error("stage3 needs --init-text and --init-code (the two stage-2 exports)")
        init_from = {"text": args.init_text, "code": args.init_code}
    else:
        init_from = args.init_from
    model_cfg = get_config(args.model, vocab_size=manifest.vocab_size, seq_len=manifest.seq_len)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = out / Path(manifest.tokenizer_path).name
    tokenizer_file.write_bytes(storage.read_bytes(storage.join(manifest_dir(args.data), manifest.tokenizer_path)))

    domains = STAGE_DOMAINS[args.stage]
    mixed = args.stage == "stage3"  # the fusion layer learns to combine both experts: both domains per batch
    train = ShardLoader(args.data, domains, split="train", micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                        every_batch_has_all_domains=mixed)
    val = ShardLoader(args.data, domains, split="val", micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                      every_batch_has_all_domains=mixed, infinite=False, prefetch=False)
    setup = prepare_stage(args.stage, model_cfg, cfg, init_from=init_from)
    try:
        result = Trainer(setup, cfg, train, val, out_dir=out, tokenizer_file=tokenizer_file).fit()
    finally:
        train.close()
        val.close()
    best = f"best val_loss {result.best.loss:.4f} (perplexity {result.best.perplexity:.2f})" if result.best else "no validation"
    print(f"{args.stage}: {result.step} steps, {best}; exports: {result.best_export}, {result.final_export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
