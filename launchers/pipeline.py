"""The whole pipeline on Ray: prep -> stage1 -> stage2-text + stage2-code -> stage3 -> evaluation -> sample.

    python -m launchers.pipeline                                   # `make smoke`: configs/smoke.toml
    python -m launchers.pipeline --config configs/smoke.toml --set train.max_steps=20 --out runs/quick
    python -m launchers.pipeline --address http://head:8265 --out s3://bucket/runs/smoke

Every stage is a Ray job of the same `launchers.train` command a user would submit, with the same
--config and --set values. Without --address the pipeline starts (and stops) a local Ray head.
Exit code 1 when a stage or a check on the final evaluation table fails, 2 for input problems;
SIGINT/SIGTERM stop every job it started and the head.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from launchers.cli import Alias, alias_values, parser_for, prog_name, run, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
ALIASES = (
    Alias("--out", "pipeline.out", "where data, stage runs and the report go (path or s3://)"),
    Alias("--address", "pipeline.address", "the dashboard of an existing Ray cluster (http://host:8265)"),
    Alias("--num-cpus", "pipeline.num_cpus", "CPUs of the local Ray head", int),
)
log = logging.getLogger("launchers.pipeline")


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("launchers.pipeline")
    parser = parser_for(prog, __doc__, ALIASES)
    args = parser.parse_args(argv)
    from core.config import ConfigError, read_toml, resolve, resolve_path, toml_text
    from core.configtree import merge

    config_path = args.config or str(DEFAULT_CONFIG)
    try:
        values = merge(read_toml(config_path), alias_values(args))
        if values.get("pipeline", {}).get("out"):
            values["pipeline"]["out"] = resolve_path(values["pipeline"]["out"])
        cfg = resolve(values, overrides=args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if args.print_config:
        print(toml_text(cfg.to_dict()), end="")
        return 0
    setup_logging()

    def body() -> int:
        from cluster.job_runner import JobFailed
        from cluster.pipeline import PipelineCheckFailed, run_pipeline

        try:
            run_pipeline(values, config_path=str(Path(config_path).resolve()), overrides=args.overrides)
        except (JobFailed, PipelineCheckFailed) as error:
            print(f"{prog}: FAILED: {error}", file=sys.stderr)
            return 1
        return 0

    return run(prog, body)


if __name__ == "__main__":
    sys.exit(main())
