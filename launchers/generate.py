"""`python -m launchers.generate --checkpoint EXPORT_DIR --prompt "..." --max-new-tokens N
[--expert text|code|fused] [--temperature T] [--top-k K] [--seed S]`

Samples from a weights export (a run's best/ or final/ directory), feeding the prompt once and then
one token at a time with the recurrent state. The tokenizer is the one stored beside the export.
"""
from __future__ import annotations

import argparse
import sys

from mmrec.train.byte_tokenizer import load_tokenizer
from mmrec.train.export import build_from_export, read_export
from mmrec.train.generate import generate, step_fn_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="export directory (or its model.safetensors)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--expert", choices=("text", "code", "fused"), default=None,
                        help="path of a stage-3 model (default: fused); not allowed for single-expert exports")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    export = read_export(args.checkpoint)
    tokenizer = load_tokenizer(export.directory)
    model = build_from_export(export)
    expert = None if args.expert in (None, "fused") else args.expert
    if export.kind == "expert" and args.expert is not None:
        parser.error(f"{args.checkpoint} is a single expert ({export.info['stage']}); drop --expert")
    prompt_ids = tokenizer.encode(args.prompt)
    new_ids = generate(step_fn_for(model, expert), prompt_ids, args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(new_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
