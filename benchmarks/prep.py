"""python -m benchmarks.prep [--demo-mb 4]: prep and loader throughput against plain baselines.

Prints one table, all measured in this run on the same data:
  * prep tokens/s on one core: what each encode task of prepare() does once its documents are read
    (datasets_prep.pipeline._encode_partition: train/val split by hash, grouping by (domain,
    split), SentencePieceTokenizer.encode_stream, core.shards.pack_stream), against raw
    SentencePieceProcessor.encode of the same documents as str on one thread, the way a user calls
    it (the faster of one batch call and a call per document). Both take turns within each round;
    the best round of each is kept, in wall time and in CPU time of this process. tokens/s is our
    token count (EOS excluded) over each one's time, so the ratio is the ratio of times;
  * loader samples/s: ShardLoader (checksums, (seed, epoch) order, rank slicing) against a plain
    sequential webdataset read of the same shards.
"""
from __future__ import annotations

import argparse
import glob
import platform
import tempfile
import time

import numpy as np

from core import shards as shard_format
from core import storage
from datasets_prep import sources
from core.manifest import Manifest, ShardInfo, save_manifest
from datasets_prep.tokenizer_training import train_tokenizer


def _best_of(repeats: int, *fns, clock=time.perf_counter) -> list[float]:
    """Best time of each fn over `repeats` rounds, the fns taking turns within a round so
    that load from other processes hits ours and the baseline alike."""
    return _best_of_clocks(repeats, *fns, clocks=(clock,))[0]


def _best_of_clocks(repeats: int, *fns, clocks) -> list[list[float]]:
    """_best_of on several clocks at once: [clock][fn] best times."""
    best = [[float("inf")] * len(fns) for _ in clocks]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            started = [clock() for clock in clocks]
            fn()
            for c, clock in enumerate(clocks):
                best[c][i] = min(best[c][i], clock() - started[c])
    return best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prep-repeats", type=int, default=20,
                        help="rounds of the prep comparison (each runs ours and the baselines)")
    args = parser.parse_args()

    docs = [d for item in sources.demo_items(args.demo_mb) for d in sources.read_item(item)]
    texts = [d.text for d in docs]
    tokenizer = train_tokenizer(texts[::4], args.vocab_size, num_threads=1)
    dtype = shard_format.token_dtype(tokenizer.vocab_size)
    # Our token count from the plain per-text reference, which the fast stream must equal.
    reference = [tokenizer.encode(text) for text in texts]
    n_tokens = sum(map(len, reference))
    expected = np.fromiter((t for ids in reference for t in ids + [tokenizer.eos_id]), np.int64)
    if not np.array_equal(tokenizer.encode_stream(texts, np.dtype(np.int64)), expected):
        raise SystemExit("encode_stream differs from per-text encode: the figure would be void")
    del reference, expected

    def ours():  # _encode_partition after reading its items, on one core
        grouped: dict[tuple[str, str], list[str]] = {}
        for doc in docs:
            key = (doc.domain, shard_format.split_of(doc.text, 0.01))
            grouped.setdefault(key, []).append(doc.text)
        for key in sorted(grouped):
            shard_format.pack_stream(tokenizer.encode_stream(grouped[key], dtype), args.seq_len + 1)

    raw = tokenizer._sp  # the bare SentencePieceProcessor: the baseline encodes the same documents

    def raw_batch():
        return raw.encode(texts, num_threads=1)

    def raw_per_document():
        return [raw.encode(text) for text in texts]

    (wall_ours, wall_batch, wall_each), (cpu_ours, cpu_batch, cpu_each) = _best_of_clocks(
        args.prep_repeats, ours, raw_batch, raw_per_document,
        clocks=(time.perf_counter, time.process_time))
    wall_raw, cpu_raw = min(wall_batch, wall_each), min(cpu_batch, cpu_each)  # the faster call
    prep_ours, prep_raw = n_tokens / wall_ours, n_tokens / wall_raw

    with tempfile.TemporaryDirectory() as out:
        token_lists = tokenizer.encode_many([d.text for d in docs if d.domain == "code"])
        samples, _ = shard_format.pack(token_lists, tokenizer.eos_id, args.seq_len + 1, dtype)
        infos = []
        for number, start in enumerate(range(0, len(samples), 256)):
            data = shard_format.shard_bytes(samples[start:start + 256], "code", start)
            path = f"code/train/shard-{number:06d}.tar"
            storage.write_bytes(f"{out}/{path}", data)
            infos.append(ShardInfo(path, "code", "train", len(samples[start:start + 256]),
                                   samples[start:start + 256].size, len(data),
                                   shard_format.sha256_hex(data)))
        save_manifest(Manifest(seq_len=args.seq_len, token_dtype=dtype.name,
                               tokenizer_path="tokenizer.model", tokenizer_sha256=tokenizer.sha256,
                               vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                               shards=tuple(infos)), f"{out}/manifest.json")

        from mmrec.data import ShardLoader
        import webdataset as wds

        def ours_loader():
            loader = ShardLoader(f"{out}/manifest.json", ["code"], micro_batch_size=16,
                                 infinite=False)
            return sum(len(batch["tokens"]) for batch in loader)

        def plain_webdataset():
            urls = sorted(glob.glob(f"{out}/code/train/*.tar"))
            dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
            return sum(1 for sample in dataset if sample["tokens.npy"] is not None)

        n_ours, n_plain = ours_loader(), plain_webdataset()
        seconds_ours, seconds_plain = _best_of(args.repeats, ours_loader, plain_webdataset)
        load_ours, load_plain = n_ours / seconds_ours, n_plain / seconds_plain

    print(f"machine: {_cpu_model()}, 1 thread (prep); corpus: demo {args.demo_mb} MB, "
          f"{len(docs)} documents, {n_tokens} tokens, vocab {tokenizer.vocab_size}, "
          f"seq_len {args.seq_len}, {len(samples)} loader samples")
    print(f"| {'measure':<32} | {'ours':>12} | {'baseline':>12} | {'ours/baseline':>13} |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 14}|{'-' * 15}|")
    print(f"| {'prep tokens/s (1 core, wall)':<32} | {prep_ours:>12,.0f} | {prep_raw:>12,.0f} | "
          f"{prep_ours / prep_raw:>13.2f} |")
    print(f"| {'prep tokens/s (1 core, CPU time)':<32} | {n_tokens / cpu_ours:>12,.0f} | "
          f"{n_tokens / cpu_raw:>12,.0f} | {cpu_raw / cpu_ours:>13.2f} |")
    print(f"| {'loader samples/s':<32} | {load_ours:>12,.0f} | {load_plain:>12,.0f} | "
          f"{load_ours / load_plain:>13.2f} |")
    print(f"prep, best of {args.prep_repeats} rounds taking turns, wall / CPU ms: ours "
          f"{wall_ours * 1e3:.1f} / {cpu_ours * 1e3:.1f}; raw batch {wall_batch * 1e3:.1f} / "
          f"{cpu_batch * 1e3:.1f}; raw per document {wall_each * 1e3:.1f} / {cpu_each * 1e3:.1f}")
    print("prep baseline: the faster (per clock) of sp.encode(texts, num_threads=1) and "
          "[sp.encode(text) for text in texts], sp the bare SentencePieceProcessor: whole "
          "documents as str, newlines inside, ids as Python lists (its default out_type=int), "
          "one thread; both rates divide our token count")
    print("loader baseline: webdataset.WebDataset(...).decode() over the same shards")


if __name__ == "__main__":
    main()
