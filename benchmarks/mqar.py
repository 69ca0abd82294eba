"""Multi-query associative recall (MQAR): MM-Rec, MM-Rec without its associative memory, and the
same-width causal transformer, trained identically, best of a learning-rate sweep.

    python -m benchmarks.mqar [--settings 64:8:64 256:16:64 512:64:128] [--lrs 1e-3 3e-3]
                              [--steps 4000] [--batch 32] [--models mmrec mmrec-no-memory transformer] [--jobs 2]
    python -m benchmarks.mqar --settings 512:64:128 --device cuda     # the d = 128 row is a GPU-sized job

On 2 CPU cores a (model, lr) run takes ~15 min at T = 64 and about 4x that at T = 256; --jobs runs
them in parallel processes (one torch thread each).

The task is the generator of Zoology (Arora et al. 2023, `multiquery_ar`), reimplemented here: the
vocabulary is split into keys [1, V/2) and values [V/2, V); a sequence of length T opens with
`pairs` key-value pairs (distinct keys, distinct values), and each key is queried once more at a
later position drawn from a power law over the remaining slots (a = 0.01, so queries favour the
near end of the context); every other position is a uniformly random token. The model is scored
only at the queried positions: it must output the value that followed the key. Recall is the
fraction of answer positions whose argmax is right, on 1,000 held-out sequences (chance 2 / V).

Each setting is T:pairs:d_model. Every model has 2 layers, FFN 4d, d/16 heads (4 at d = 64) and the
same vocabulary, max(512, 2T) unless --vocab says otherwise (Zoology's own examples use 256 to 8192;
the generator needs V > T); every run sees the same batches (fresh samples each step, one seed),
AdamW (0.9, 0.95), weight decay 0.1 on matrices, 10 % linear warm-up, cosine to zero, clipping at 1.0.
Head count matters for how fast recall is learned: at T = 64 / 8 pairs, lr 3e-3, MM-Rec with one
head of 64 broke through after ~5,500 steps, with four heads of 16 after ~1,700; the transformer
with one head after ~4,700, with four after ~3,500.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks import _harness
from mmrec.config import get_config
from mmrec.model import build_base, count_parameters
from mmrec.train.hardware import resolve_precision

IGNORE = -100


def multiquery_ar(
    vocab_size: int, num_examples: int, seq_len: int, num_pairs: int, *, generator: torch.Generator,
    power_a: float = 0.01, random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's MQAR sequences: inputs [N, T] and labels [N, T] (IGNORE except at the queried keys)."""
    if seq_len % 2 or vocab_size <= seq_len or 4 * num_pairs > seq_len:
        raise ValueError(f"MQAR needs an even T < vocab and 4 * pairs <= T; got T={seq_len}, V={vocab_size}, "
                         f"pairs={num_pairs}")
    N, context = num_examples, 2 * num_pairs
    key_vocab = vocab_size // 2

    def distinct(low: int, high: int) -> torch.Tensor:  # num_pairs distinct draws from [low, high) per row
        return low + torch.rand(N, high - low, generator=generator).argsort(dim=1)[:, :num_pairs]

    keys, values = distinct(1, key_vocab), distinct(key_vocab, vocab_size)
    kvs = torch.stack([keys, values], dim=2).reshape(N, context)
    space = (seq_len - context) // 2
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((weights / weights.sum()).expand(N, space), num_pairs, replacement=False,
                             generator=generator)  # [N, pairs], distinct
    queries = torch.zeros(N, seq_len - context + 1, dtype=torch.long)
    queries.scatter_(1, 2 * gaps, keys)
    examples = torch.cat([kvs, queries], dim=1)  # [N, T + 1]
    labels = torch.full((N, seq_len + 1), IGNORE, dtype=torch.long)
    labels.scatter_(1, 2 * gaps + context + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = torch.randint(vocab_size, inputs.shape, generator=generator)[filler]
    return inputs, labels


def answer_logits(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions only [n, V] and their targets [n]."""
    features, _ = model.features(inputs)
    where = labels != IGNORE
    return model.head(features[where]).float(), labels[where]


def mqar_loss(model, batch) -> torch.Tensor:
    logits, targets = answer_logits(model, *batch)
    return F.cross_entropy(logits, targets)


def build(kind: str, vocab: int, d_model: int, heads: int, seq_len: int):
    from benchmarks.model import TransformerBaseline

    config = get_config("tiny", vocab_size=vocab, d_model=d_model, n_layers=2, ffn_dim=4 * d_model,
                        n_heads=heads, seq_len=seq_len)
    if kind == "transformer":
        return TransformerBaseline(config)
    if kind == "mmrec":
        return build_base(config)
    if kind == "mmrec-no-memory":
        return build_base(config.replace(**NO_MEMORY))
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


MODELS = ("mmrec", "mmrec-no-memory", "transformer")
NO_MEMORY = {"memory": False}  # the ablation: the first design's channel recurrence in the memory's place


def run_cell(args: dict, kind: str, lr: float, seq_len: int, pairs: int, d_model: int) -> dict:
    """Train and score one (model, learning rate) of one setting. Batches and test set depend only on the
    seeds, so every cell sees the same data whether cells run in turn or in parallel processes."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    dtype = args["dtype"]
    vocab = args["vocab"] or max(512, 2 * seq_len)
    test_inputs, test_labels = multiquery_ar(vocab, args["test_examples"], seq_len, pairs,
                                             generator=torch.Generator().manual_seed(1234))
    test_inputs, test_labels = test_inputs.to(device), test_labels.to(device)
    train_gen = torch.Generator().manual_seed(args["seed"])

    def next_batch(step: int):  # called once per step, in order: a fresh batch each time
        inputs, labels = multiquery_ar(vocab, args["batch"], seq_len, pairs, generator=train_gen)
        return inputs.to(device), labels.to(device)

    def evaluate(model) -> dict[str, float]:
        correct = total = 0
        for start in range(0, len(test_inputs), 250):
            logits, targets = answer_logits(model, test_inputs[start:start + 250], test_labels[start:start + 250])
            correct += int((logits.argmax(-1) == targets).sum())
            total += targets.numel()
        return {"recall": correct / total}

    torch.manual_seed(args["seed"])
    model = build(kind, vocab, d_model, args["heads"] or max(1, d_model // 16), seq_len).to(device)
    steps = args["steps"]
    out = _harness.train(model, next_batch, mqar_loss, steps=steps, lr=lr, warmup=steps // 10, dtype=dtype,
                         evaluate=evaluate, log_every=args["log_every"], label=f"{kind} T={seq_len} lr={lr:g}")
    recall = out.evals[-1][1]["recall"] if out.evals else float("nan")
    result = {"kind": kind, "lr": lr, "recall": recall, "seconds": out.seconds, "params": count_parameters(model),
              "final_loss": out.losses[-1][1], "vocab": vocab}
    print(f"  {kind:<16} T={seq_len:<4} pairs={pairs:<3} d={d_model:<4} lr={lr:<7g} recall {recall:.4f} "
          f"loss {result['final_loss']:.4f} ({out.seconds:.0f} s, {result['params'] / 1e3:.0f}K params)", flush=True)
    return result


def run_setting(args: dict, models: list[str], lrs: list[float], jobs: int, seq_len: int, pairs: int,
                d_model: int) -> dict[str, list[dict]]:
    cells = [(args, kind, lr, seq_len, pairs, d_model) for kind in models for lr in lrs]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            done = pool.starmap(run_cell, cells)
    else:
        done = [run_cell(*cell) for cell in cells]
    return {kind: [r for r in done if r["kind"] == kind] for kind in models}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["64:8:64", "256:16:64", "512:64:128"],
                        help="T:pairs:d_model per setting (default: the issue's three)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=0,
                        help="vocabulary (default: max(512, 2T); Zoology's generator needs V > T)")
    parser.add_argument("--heads", type=int, default=0, help="heads of every model (default: d_model / 16)")
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="fp32",
                        help="auto: bf16 autocast on CUDA or on a CPU where bf16 matmuls are measured faster")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    parser.add_argument("--jobs", type=int, default=1, help="(model, lr) runs trained in parallel processes")
    parser.add_argument("--log-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jobs > 1 and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype, precision = resolve_precision(args.precision, device)
    cell_args = {key: getattr(args, key) for key in ("threads", "device", "vocab", "test_examples", "seed", "batch",
                                                     "heads", "steps", "log_every")} | {"dtype": dtype}
    settings = []
    for text in args.settings:
        try:
            seq_len, pairs, d_model = (int(v) for v in text.split(":"))
        except ValueError:
            parser.error(f"--settings takes T:pairs:d_model, got {text!r}")
        settings.append((seq_len, pairs, d_model))

    vocab = args.vocab or "max(512, 2T)"
    heads = args.heads or "d/16"
    print(f"MQAR (Zoology generator), 2 layers, heads {heads}, vocab {vocab}, {args.steps} steps x batch {args.batch}, "
          f"lrs {args.lrs}; {_harness.machine_line(device)}; {precision}")
    start = time.perf_counter()
    table = []
    for seq_len, pairs, d_model in settings:
        results = run_setting(cell_args, args.models, args.lrs, args.jobs, seq_len, pairs, d_model)
        row = [str(seq_len), str(pairs), str(d_model)]
        for kind in args.models:
            best = max(results[kind], key=lambda r: (r["recall"], -r["lr"]))
            row.append(f"{best['recall']:.3f} ({best['lr']:g})")
        table.append(row)
    print(f"\nrecall on {args.test_examples} held-out sequences, best lr in brackets; chance = 2 / vocab "
          f"({time.perf_counter() - start:.0f} s in all)")
    _harness.print_table(["T", "pairs", "d"] + list(args.models), table)


if __name__ == "__main__":
    main()
