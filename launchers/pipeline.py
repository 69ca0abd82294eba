"""The whole pipeline on one Ray cluster: prep, the four stage jobs, evaluation and a sample.

    python -m launchers.pipeline                      # the CPU smoke run: demo corpus, tiny model, 2 workers, ZeRO-2 + offload
    python -m launchers.pipeline --address http://head:8265 --config configs/my.toml --set train.max_steps=1000

Exit code 0 only when every stage finished and each stage-2 expert beat the base on its own domain.
"""
from __future__ import annotations

import argparse
import sys

from cluster import ConfigError
from cluster.pipeline import PipelineCheckFailed, PipelineConfig, run_pipeline


def main(argv: list[str] | None = None) -> int:
    defaults = PipelineConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m launchers.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=defaults["out"].default, help="output directory (default %(default)s)")
    parser.add_argument("--source", action="append", help="prep source (repeatable; default demo?max_mb=4)")
    parser.add_argument("--vocab-size", type=int, default=defaults["vocab_size"].default)
    parser.add_argument("--config", default=defaults["config"].default, help="job config for every stage (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override for every stage, e.g. --set train.max_steps=200")
    parser.add_argument("--address", default="", help="Ray dashboard URL; default: start a local head for this run")
    parser.add_argument("--num-cpus", type=int, default=defaults["num_cpus"].default, help="CPUs of the local head")
    args = parser.parse_args(argv)
    try:
        cfg = PipelineConfig(
            out=args.out, vocab_size=args.vocab_size, config=args.config, overrides=tuple(args.overrides),
            address=args.address, num_cpus=args.num_cpus,
            **({"sources": tuple(args.source)} if args.source else {}),
        )
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        run_pipeline(cfg)
    except PipelineCheckFailed as error:
        print(f"[pipeline] FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
