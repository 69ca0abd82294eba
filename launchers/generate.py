"""Sample text from an export, feeding the prompt once and then one token at a time with the recurrent state.

    python -m launchers.generate --export runs/smoke/stages/stage3/exports/step_00000060 --prompt "def main("
    python -m launchers.generate --export run:stage3 --set run.storage_path=runs/smoke/stages --num-samples 3 --top-p 0.9

--export is an export directory (path or s3://) or run:<name>[@best|@latest] under run.storage_path.
A fused (stage-3) export samples through the fusion by default; --path text|code picks one expert.
Sampling: temperature (0 = greedy), top-k, top-p; it stops at the end-of-text token unless
--no-stop-at-eos. The tokenizer is the one stored beside the export.
"""
from __future__ import annotations

import sys

from launchers.cli import Alias, UsageError, load, parser_for, prog_name, run

ALIASES = (
    Alias("--export", "generate.export", "export directory, or run:<name>[@best|@latest]"),
    Alias("--prompt", "generate.prompt", "the text to continue"),
    Alias("--max-new-tokens", "generate.max_new_tokens", "tokens to sample", int),
    Alias("--temperature", "generate.temperature", "0 = greedy", float),
    Alias("--top-k", "generate.top_k", "sample among the k most likely tokens (0: off)", int),
    Alias("--top-p", "generate.top_p", "nucleus sampling (1: off)", float),
    Alias("--num-samples", "generate.num_samples", "independent samples", int),
    Alias("--seed", "generate.seed", "random seed (-1: fresh)", int),
    Alias("--path", "generate.path", "auto | fused | text | code"),
    Alias("--device", "generate.device", "auto | cpu | cuda"),
    Alias("--no-stop-at-eos", "generate.stop_at_eos", "keep sampling past the end-of-text token", "false"),
)


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("launchers.generate")
    parser = parser_for(prog, __doc__, ALIASES)
    args = parser.parse_args(argv)
    cfg = load(parser, args, sections=("generate", "run"), paths=("generate.export", "run.storage_path"))
    options = cfg.generate
    if not options.export:
        parser.error("no export given: pass --export DIR (or run:<name>)")
    if not options.prompt:
        parser.error("the prompt is empty: pass --prompt TEXT (the model has no begin-of-text token to start from)")

    def body() -> int:
        from mmrec.train.export import open_export
        from mmrec.train.generate import generate, step_fn_for

        loaded = open_export(options.export, storage_path=cfg.run.storage_path, device=options.device)
        model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
        if loaded.export.kind == "expert" and options.path in ("text", "code"):
            raise UsageError(f"{options.export} is a single expert ({loaded.export.info.get('stage')}); --path applies "
                             "to a fused (stage-3) export")
        path = None if options.path in ("auto", "fused") else options.path
        prompt_ids = tokenizer.encode(options.prompt)
        for sample in range(options.num_samples):
            seed = None if options.seed < 0 else options.seed + sample
            ids = generate(step_fn_for(model, path), prompt_ids, options.max_new_tokens,
                           temperature=options.temperature, top_k=options.top_k or None, top_p=options.top_p,
                           seed=seed, stop_id=tokenizer.eos_id if options.stop_at_eos else None, device=device)
            if options.num_samples > 1:
                print(f"--- sample {sample + 1}/{options.num_samples}")
            print(options.prompt + tokenizer.decode(ids))
        return 0

    from mmrec.train.export import ExportError

    return run(prog, body, usage_errors=(ExportError,))


if __name__ == "__main__":
    sys.exit(main())
