"""Run one training stage as a Ray Train + DeepSpeed job.

    python -m launchers.train --stage stage1 --config configs/smoke.toml --set data.manifest=runs/data/manifest.json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launchers.train --stage stage1 ...

The config is validated before Ray starts: a wrong key is an error naming the key (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import sys

from cluster import ConfigError, load_job_config, run_stage
from mmrec.train import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, help="the stage to run (or stage = ... in the config file)")
    parser.add_argument("--config", help="TOML job config (see configs/smoke.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 --set zero.stage=3 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    args = parser.parse_args(argv)
    try:
        job = load_job_config(args.config, stage=args.stage, overrides=args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(job.to_dict(), indent=1))
        return 0
    result = run_stage(job)
    print(f"[{result.stage}] done in {result.seconds:.0f}s: checkpoint {result.checkpoint}")
    print(f"[{result.stage}] export {result.export}")
    if "val_perplexity" in result.metrics:
        print(f"[{result.stage}] validation perplexity {result.metrics['val_perplexity']:.2f} (loss {result.metrics['val_loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
