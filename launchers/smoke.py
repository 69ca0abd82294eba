"""`python -m launchers.smoke [--out DIR] [--steps-scale X]`: the CPU smoke pipeline, all four stages
and generation in one process (see mmrec.train.smoke)."""
from __future__ import annotations

import argparse
import sys
import time

from mmrec.train.smoke import SmokeCheckError, run_smoke


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__)
    parser.add_argument("--out", default="runs/smoke", help="output directory (default: runs/smoke)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (e.g. 0.1)")
    parser.add_argument("--max-mb", type=float, default=3.0, help="corpus size in MB, half code, half prose")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be > 0")
    started = time.perf_counter()
    try:
        run_smoke(args.out, steps_scale=args.steps_scale, max_mb=args.max_mb)
    except SmokeCheckError as error:
        print(f"smoke: FAILED: {error}", file=sys.stderr)
        return 1
    print(f"smoke: OK in {time.perf_counter() - started:.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
