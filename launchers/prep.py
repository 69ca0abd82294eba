"""python -m launchers.prep --source demo --out s3://bucket/run  (also under `ray job submit`).

Runs datasets_prep as Ray tasks on the cluster in RAY_ADDRESS, or on a fresh local instance.
"""
from __future__ import annotations

import argparse
import sys

from datasets_prep import prepare
from core.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", action="append", default=None,
                        help="repeatable: demo[?max_mb=N] | dir:PATH?glob=*.py&domain=code | "
                             "jsonl:PATH_OR_S3?glob=*.jsonl (default: demo)")
    parser.add_argument("--out", required=True, help="output directory: a path, file:// or s3://")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--partition-mb", type=float, default=16.0)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=16.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest_url = prepare(args.source or ["demo"], out=args.out, vocab_size=args.vocab_size,
                               seq_len=args.seq_len, val_fraction=args.val_fraction,
                               shard_mb=args.shard_mb, partition_mb=args.partition_mb,
                               tokenizer_sample_mb=args.tokenizer_sample_mb,
                               progress=not args.no_progress)
    except (StorageError, ValueError) as exc:
        print(f"prep failed: {exc}", file=sys.stderr)
        return 2
    print(manifest_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
