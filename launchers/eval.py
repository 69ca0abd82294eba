"""Score an export on held-out data: validation loss, perplexity and token accuracy, per expert and fused.

    python -m launchers.eval --export run:stage3 --set run.storage_path=runs/smoke/stages --data runs/smoke/data/manifest.json
    python -m launchers.eval --export runs/x/exports/step_00000500 --data held_out.jsonl --max-tokens 200000 --json out.json

--data: a manifest.json (its val split, per domain and mixed), a JSONL / Parquet file, a directory of
text files, or any prep source (jsonl:PATH?text_field=content, dir:PATH?domain=code, ...); raw text is
tokenized with the export's own tokenizer and packed like training samples, each row read as a document
start: its first token is predicted from EOS, so every token is scored (one document of seq_len + 1
tokens is one row, scored as lm-eval's loglikelihood_rolling scores it). A fused export is scored
on each path (fused, text expert, code expert); prints a table and, with --json, writes it.
"""
from __future__ import annotations

import json
import sys

from launchers.cli import Alias, UsageError, load, parser_for, prog_name, run

ALIASES = (
    Alias("--export", "eval.export", "export directory, or run:<name>[@best|@latest]"),
    Alias("--data", "eval.data", "manifest.json, JSONL/Parquet file, directory or prep source"),
    Alias("--max-tokens", "eval.max_tokens", "stop after about this many tokens per domain (0: all)", int),
    Alias("--batch-size", "eval.batch_size", "rows per forward", int),
    Alias("--path", "eval.path", "all | fused | text | code (fused exports)"),
    Alias("--json", "eval.json", "also write the table as JSON here"),
    Alias("--device", "eval.device", "auto | cpu | cuda"),
)


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("launchers.eval")
    parser = parser_for(prog, __doc__, ALIASES)
    args = parser.parse_args(argv)
    cfg = load(parser, args, sections=("eval", "run"), paths=("eval.export", "eval.data", "eval.json", "run.storage_path"))
    options = cfg.eval
    if not options.export or not options.data:
        parser.error("give both --export (an export directory or run:<name>) and --data")

    def body() -> int:
        from core import storage
        from mmrec.evaluation import model_paths, path_forward, score_rows, validation_batches
        from mmrec.train.export import open_export

        loaded = open_export(options.export, storage_path=cfg.run.storage_path, device=options.device)
        export, model, tokenizer, device, url = loaded.export, loaded.model, loaded.tokenizer, loaded.device, loaded.url
        start_id = None  # manifest rows are scored as in training validation
        if options.data.endswith("manifest.json"):
            from core.manifest import load_manifest

            manifest = load_manifest(options.data)
            if manifest.tokenizer_sha256 != tokenizer.sha256:
                raise UsageError(f"{options.data} was tokenized with another tokenizer than {options.export}'s: "
                                 "its token ids mean other pieces; score raw text instead (a JSONL file)")
            data = {domain: validation_batches(options.data, domains, split=options.split, batch_size=options.batch_size,
                                               max_tokens=options.max_tokens)
                    for domain, domains in (("text", ("text",)), ("code", ("code",)), ("mixed", ("text", "code")))}
        else:
            from datasets_prep.evalsets import packed_batches

            data = packed_batches(options.data, tokenizer, seq_len=export.model_config.seq_len,
                                  batch_size=options.batch_size, max_tokens=options.max_tokens)
            start_id = tokenizer.eos_id  # raw text: a row's first token is scored too, predicted from EOS
        paths = model_paths(model)
        if options.path not in ("all", "auto"):
            if options.path not in paths:
                raise UsageError(f"--path {options.path}: this {export.kind} export has the paths {list(paths)}")
            paths = (options.path,)
        table: dict[str, dict[str, dict[str, float]]] = {}
        for path in paths:
            forward = path_forward(model, path)
            table[path] = {}
            for domain, batches in data.items():
                result = score_rows(forward, batches, device, start_id=start_id).result()
                table[path][domain] = {"loss": result.loss, "perplexity": result.perplexity,
                                       "accuracy": result.accuracy, "tokens": result.tokens}
        domains = list(data)
        print(f"{'path':8s} " + " ".join(f"{d + ' loss':>12s} {'ppl':>9s} {'acc':>6s}" for d in domains))
        for path, row in table.items():
            print(f"{path:8s} " + " ".join(f"{row[d]['loss']:12.4f} {row[d]['perplexity']:9.2f} {row[d]['accuracy']:6.3f}"
                                           for d in domains))
        if options.json:
            storage.write_text(options.json, json.dumps({"export": url, "data": options.data, "table": table}, indent=1) + "\n")
        return 0

    from mmrec.train.export import ExportError

    return run(prog, body, usage_errors=(ExportError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
