"""Train one stage: in this process (engine.kind = "torch") or as a Ray Train job of DeepSpeed workers
(engine.kind = "deepspeed"), with the same loop, checkpoints, exports and records either way.

    python -m launchers.train --stage stage1 --config configs/smoke.toml --set data.manifest=runs/data/manifest.json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launchers.train --stage stage1 ...

Everything is checked before any work starts (a wrong key, a missing manifest, a tokenizer that
does not match its hash, a vocabulary that does not fit: exit 2 with the reason). SIGINT/SIGTERM
in a single-process run write a checkpoint at the next step boundary and stop; run the same
command again to resume.
"""
from __future__ import annotations

import logging
import sys
import time

from launchers.cli import load, on_stop_signals, parser_for, prog_name, run, setup_logging

PATHS = ("data.manifest", "run.storage_path", "run.init_from", "run.init_from_text", "run.init_from_code")
SECTIONS = ("model", "train", "data", "run", "engine", "scaling", "fault_tolerance", "fault", "metrics", "ray")
log = logging.getLogger("launchers.train")


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("launchers.train")
    parser = parser_for(prog, __doc__, stage=True)
    args = parser.parse_args(argv)
    cfg = load(parser, args, sections=SECTIONS, paths=PATHS)
    if not cfg.stage:
        parser.error("no stage given: pass --stage or set stage = \"...\" in the config file")
    setup_logging()

    def body() -> int:
        from mmrec.train.loop import NonFiniteLossError

        if cfg.engine.kind == "deepspeed":
            from cluster import run_stage

            result = run_stage(cfg)
            log.info("[%s] done in %.0fs: run %s", result.stage, result.seconds, result.run_url)
            log.info("[%s] best export %s", result.stage, result.best_export)
            if "val_perplexity" in result.metrics:
                log.info("[%s] validation perplexity %.2f (loss %.4f)", result.stage, result.metrics["val_perplexity"],
                         result.metrics["val_loss"])
            return 0
        from mmrec.metrics.exporter import exporter_for
        from mmrec.train.loop import Trainer
        from mmrec.train.preflight import preflight

        log.info("[%s] %s", cfg.stage, preflight(cfg))
        exporter = exporter_for(cfg, rank=0, world_size=1)
        trainer = Trainer(cfg, metrics=exporter)
        on_stop_signals(trainer.request_stop)
        try:
            result = trainer.fit()
        except NonFiniteLossError as error:
            print(f"{prog}: {error}", file=sys.stderr)
            return 1
        finally:
            if exporter is not None:
                time.sleep(cfg.metrics.linger_s)
                exporter.close()
        best = f"best val_loss {result.best_loss:.4f}" if result.best_loss is not None else "no validation"
        log.info("[%s] %d steps, %s; best export %s", cfg.stage, result.step, best,
                 result.best_export or result.latest_export)
        return 0 if result.interrupted is None else 130

    from cluster.ray_connect import RayConnectError
    from mmrec.train.export import ExportError

    return run(prog, body, usage_errors=(RayConnectError, ExportError))


if __name__ == "__main__":
    sys.exit(main())
