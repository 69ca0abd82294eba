"""Prepare a dataset: sources -> SentencePiece tokenizer -> packed shards + manifest.json (as Ray tasks).

    python -m launchers.prep --source demo --out s3://bucket/run --vocab-size 32000 --seq-len 2048
    python -m launchers.prep --config configs/smoke.toml --set prep.out=runs/data

Runs on the Ray cluster of --set ray.address / RAY_ADDRESS (inside `ray job submit`, the job's own),
else on a fresh local instance; never on a stale one. The dataset is published in one step: an
interrupted run leaves the previous dataset in --out intact.
"""
from __future__ import annotations

import logging
import sys

from launchers.cli import Alias, load, parser_for, prog_name, run, setup_logging

ALIASES = (
    Alias("--source", "prep.sources", "demo[?max_mb=N] | dir:PATH?glob=*.py&domain=code | jsonl:PATH_OR_S3?... "
          "(see docs/data.md)", "append"),
    Alias("--out", "prep.out", "output directory: a path, file:// or s3://"),
    Alias("--vocab-size", "prep.vocab_size", "SentencePiece vocabulary size", int),
    Alias("--seq-len", "prep.seq_len", "tokens per training sample (the model's train.seq_len)", int),
    Alias("--tokenizer", "prep.tokenizer", "use this SentencePiece .model instead of training one"),
    Alias("--no-progress", "prep.progress", "no progress bars", "false"),
)
log = logging.getLogger("launchers.prep")


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("launchers.prep")
    parser = parser_for(prog, __doc__, ALIASES)
    args = parser.parse_args(argv)
    cfg = load(parser, args, sections=("prep", "ray"), paths=("prep.out", "prep.tokenizer"))
    if not cfg.prep.out:
        parser.error("no output directory: pass --out DIR (or set prep.out)")
    setup_logging()

    def body() -> int:
        from cluster.ray_connect import connect
        from core import storage
        from datasets_prep.pipeline import run_prep

        storage.check_writable_location(cfg.prep.out)  # before Ray starts: a bad bucket fails in a second
        connect(cfg.ray)
        print(run_prep(cfg.prep))
        return 0

    from cluster.ray_connect import RayConnectError

    return run(prog, body, usage_errors=(RayConnectError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
