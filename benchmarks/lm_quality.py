"""Language-model quality: the `small` MM-Rec against a transformer of the same width and (within 5 %)
the same parameter count, trained on the same tokens of the demo corpus, at each sequence length.

    python -m benchmarks.lm_quality [--lengths 512 2048] [--tokens 3e6] [--batch-tokens 16384]
                                    [--demo-mb 16] [--png runs/bench/lm_quality.png] [--cache DIR]

Data: the `demo` corpus of datasets_prep (stdlib .py files as code, man pages and /usr/share/doc as
text), read in this process (no Ray), documents split 95/5 into train/validation by a hash of their
id, a SentencePiece tokenizer of the project (datasets_prep.train_tokenizer, vocabulary of `small`)
trained on the training documents, and one token stream per domain and split (documents joined by
EOS). Every training batch holds the same number of windows from each domain, at offsets drawn from
one seed: both models see exactly the same tokens. Validation: non-overlapping windows of the
validation streams, loss per domain on every position.

The transformer (benchmarks.model.TransformerBaseline: RoPE, RMSNorm, SwiGLU, tied head) keeps
d_model, heads and vocabulary; its depth and FFN width are chosen to match MM-Rec's parameter count
(both counts printed). Both train with the harness's AdamW (0.9, 0.95), weight decay 0.1, 5 %
warm-up, cosine to zero, clipping 1.0, at the given learning rate. bf16 autocast only where it is
faster (CUDA, or a CPU whose bf16 matmul beats fp32; the line printed first says which and why).
"""
from __future__ import annotations

import argparse
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import _harness
from benchmarks.model import TransformerBaseline
from mmrec.config import ModelConfig, get_config
from mmrec.model import build_base, count_parameters
from mmrec.train.hardware import resolve_precision

DOMAINS = ("text", "code")


def demo_streams(max_mb: float, vocab_size: int, val_every: int = 20, cache: str | None = None
                 ) -> tuple[dict[str, np.ndarray], int, dict]:
    """{"text/train": ids, "text/val": ids, "code/train": ..., "code/val": ...}, the tokenizer's vocabulary
    size, and corpus counts. Documents go to validation when crc32(doc_id) % val_every == 0. With `cache`,
    the streams are kept in that folder (keyed by the arguments) and reused by later runs."""
    cached = Path(cache) / f"demo-{max_mb:g}mb-v{vocab_size}-val{val_every}.npz" if cache else None
    if cached is not None and cached.exists():
        with np.load(cached) as data:
            streams = {key.replace("__", "/"): data[key] for key in data.files if "__" in key}
            counts = {key: (int(n), len(streams[key])) for key, n in zip(streams, data["documents"])}
            return streams, int(data["vocab"]), counts
    streams, vocab, counts = _prepare_demo_streams(max_mb, vocab_size, val_every)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, vocab=vocab, documents=np.array([counts[k][0] for k in streams]),
                 **{key.replace("/", "__"): ids for key, ids in streams.items()})
    return streams, vocab, counts


def _prepare_demo_streams(max_mb: float, vocab_size: int, val_every: int) -> tuple[dict[str, np.ndarray], int, dict]:
    from datasets_prep import sources
    from datasets_prep.tokenizer_training import train_tokenizer

    documents: dict[str, list[str]] = {f"{d}/{s}": [] for d in DOMAINS for s in ("train", "val")}
    for item in sources.expand(sources.parse_source(f"demo?max_mb={max_mb}")):
        for doc in sources.read_item(item):
            split = "val" if zlib.crc32(doc.doc_id.encode()) % val_every == 0 else "train"
            documents[f"{doc.domain}/{split}"].append(doc.text)
    tokenizer = train_tokenizer(documents["text/train"] + documents["code/train"], vocab_size)
    streams = {}
    for key, texts in documents.items():
        ids = tokenizer.encode_many(texts)
        streams[key] = np.concatenate([np.asarray(t + [tokenizer.eos_id], dtype=np.int64) for t in ids])
    counts = {key: (len(documents[key]), len(streams[key])) for key in documents}
    return streams, tokenizer.vocab_size, counts


def matched_transformer_config(config: ModelConfig, target: int) -> ModelConfig:
    """The transformer config (same d_model, heads, vocab) whose parameter count is closest to `target`:
    depth from n_layers to 2 n_layers, FFN width in steps of 64."""
    best = None
    with torch.device("meta"):
        for layers in range(max(1, config.n_layers), 2 * config.n_layers + 1):
            for ffn in range(256, 8 * config.d_model + 1, 64):
                candidate = config.replace(n_layers=layers, ffn_dim=ffn)
                gap = abs(count_parameters(TransformerBaseline(candidate)) - target)
                if best is None or gap < best[0]:
                    best = (gap, candidate)
    return best[1]


def lm_loss(model, batch) -> torch.Tensor:
    (tokens,) = batch
    features, _ = model.features(tokens[:, :-1])
    logits = model.head(features)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--tokens", type=float, default=3e6, help="training tokens per model and length")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per step (batch = this / T)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--demo-mb", type=float, default=16.0)
    parser.add_argument("--cache", default=None, help="folder to keep the tokenized corpus in between runs")
    parser.add_argument("--val-windows", type=int, default=32, help="validation windows per domain")
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: 8 times per run)")
    parser.add_argument("--models", nargs="+", default=["mmrec", "transformer"], choices=["mmrec", "transformer"])
    parser.add_argument("--png", default="runs/bench/lm_quality.png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype, precision = resolve_precision(args.precision, device)

    start = time.perf_counter()
    base_config = get_config(args.config)
    streams, vocab, counts = demo_streams(args.demo_mb, base_config.vocab_size, cache=args.cache)
    config = base_config.replace(vocab_size=vocab)
    print(f"LM quality on the demo corpus ({args.demo_mb:g} MB; documents/tokens "
          + ", ".join(f"{k} {n}/{t:,}" for k, (n, t) in counts.items())
          + f"; tokenizer vocab {vocab}, prepared in {time.perf_counter() - start:.0f} s)")
    print(f"{_harness.machine_line(device)}; {precision}; {args.tokens:,.0f} training tokens per model and length, "
          f"{args.batch_tokens} tokens per step, lr {args.lr:g}")

    mmrec_params = count_parameters(build_base(config))
    transformer_config = matched_transformer_config(config, mmrec_params)
    transformer_params = count_parameters(TransformerBaseline(transformer_config))
    print(f"parameters: MM-Rec {args.config} {mmrec_params:,} (D {config.d_model}, L {config.n_layers}, "
          f"ffn {config.ffn_dim}); transformer {transformer_params:,} (D {transformer_config.d_model}, "
          f"L {transformer_config.n_layers}, ffn {transformer_config.ffn_dim}), "
          f"{100 * (transformer_params / mmrec_params - 1):+.1f} %")

    rows, curves = [], {}
    for seq_len in args.lengths:
        batch = max(2, args.batch_tokens // seq_len)
        batch -= batch % 2  # same number of windows from each domain
        steps = max(1, int(args.tokens // (batch * seq_len)))
        rng = np.random.default_rng(args.seed + seq_len)
        offsets = {d: rng.integers(0, len(streams[f"{d}/train"]) - seq_len - 1, size=(steps, batch // 2))
                   for d in DOMAINS}
        val = {}
        for d in DOMAINS:
            stream = streams[f"{d}/val"]
            n = min(args.val_windows, (len(stream) - 1) // seq_len)
            if n < 1:
                raise SystemExit(f"the {d} validation stream ({len(stream)} tokens) is shorter than T={seq_len}; "
                                 f"raise --demo-mb")
            val[d] = torch.from_numpy(np.stack([stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)]))

        def next_batch(step: int):
            windows = [streams[f"{d}/train"][o : o + seq_len + 1] for d in DOMAINS for o in offsets[d][step]]
            return (torch.from_numpy(np.stack(windows)).to(device),)

        def evaluate(model) -> dict[str, float]:
            out = {}
            for d in DOMAINS:
                losses = [lm_loss(model, (val[d][i : i + 4].to(device),)).item() for i in range(0, len(val[d]), 4)]
                out[d] = float(np.mean(losses))
            return out

        for kind in args.models:
            torch.manual_seed(args.seed)
            model = (build_base(config) if kind == "mmrec" else TransformerBaseline(transformer_config)).to(device)
            result = _harness.train(model, next_batch, lm_loss, steps=steps, lr=args.lr, warmup=max(1, steps // 20),
                                    dtype=dtype, evaluate=evaluate, eval_every=args.eval_every or max(1, steps // 8),
                                    log_every=max(1, steps // 20), label=f"{kind} T={seq_len}")
            final = result.evals[-1][1] if result.evals else {d: math.nan for d in DOMAINS}
            curves[(kind, seq_len)] = result
            rows.append([str(seq_len), kind, f"{count_parameters(model):,}", f"{steps} x {batch}",
                         f"{final['text']:.4f}", f"{final['code']:.4f}", f"{(final['text'] + final['code']) / 2:.4f}",
                         f"{steps * batch * seq_len / result.seconds:,.0f}"])
            print(f"  {kind} T={seq_len}: val text {final['text']:.4f} code {final['code']:.4f} "
                  f"({result.seconds:.0f} s)", flush=True)

    print(f"\nvalidation loss (nats/token) after equal training tokens ({time.perf_counter() - start:.0f} s in all)")
    _harness.print_table(["T", "model", "params", "steps x batch", "val text", "val code", "val mean", "train tok/s"],
                         rows)
    for seq_len in args.lengths:
        by_model = {r[1]: float(r[6]) for r in rows if r[0] == str(seq_len)}
        if {"mmrec", "transformer"} <= set(by_model):
            print(f"T={seq_len}: MM-Rec / transformer validation loss = {by_model['mmrec'] / by_model['transformer']:.4f}")
    if args.png:
        write_png(curves, args.png, precision)
        print(f"loss curves: {args.png}")


def write_png(curves: dict, path: str, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({seq_len for _, seq_len in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.5), squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        for (kind, length), result in sorted(curves.items()):
            if length != seq_len:
                continue
            steps, losses = zip(*result.losses)
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            line, = ax.plot(steps[window - 1 :], smooth, label=f"{kind} train", alpha=0.8)
            for domain, marker in (("text", "o"), ("code", "s")):
                xs = [s for s, _ in result.evals]
                ax.plot(xs, [m[domain] for _, m in result.evals], marker=marker, linestyle="--",
                        color=line.get_color(), label=f"{kind} val {domain}")
        ax.set_title(f"T = {seq_len} ({precision.split(' (')[0]})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
