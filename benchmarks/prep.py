"""python -m benchmarks.prep [--demo-mb 4]: prep and loader throughput against plain baselines.

Prints one table, all measured in this run on the same data:
  * prep tokens/s on one core: our encode + train/val split + pack, against raw
    SentencePieceProcessor.encode of the same documents;
  * loader samples/s: ShardLoader (checksums, (seed, epoch) order, rank slicing) against a plain
    sequential webdataset read of the same shards.
"""
from __future__ import annotations

import argparse
import glob
import tempfile
import time

import numpy as np

from core import shards as shard_format
from core import storage
from datasets_prep import sources
from core.manifest import Manifest, ShardInfo, save_manifest
from datasets_prep.tokenizer_training import train_tokenizer


def _best_of(repeats: int, *fns) -> list[float]:
    """Best wall time of each fn over `repeats` rounds, the fns taking turns within a round so
    that load from other processes hits ours and the baseline alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = [d for item in sources.demo_items(args.demo_mb) for d in sources.read_item(item)]
    texts = [d.text for d in docs]
    tokenizer = train_tokenizer(texts[::4], args.vocab_size, num_threads=1)
    dtype = shard_format.token_dtype(tokenizer.vocab_size)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_many(texts))

    def ours():
        grouped: dict[tuple[str, str], list[str]] = {}
        for doc in docs:
            grouped.setdefault((doc.domain, shard_format.split_of(doc.text, 0.01)), []).append(doc.text)
        for group in grouped.values():  # what each encode task of prepare() does
            shard_format.pack_stream(tokenizer.encode_stream(group, dtype), args.seq_len + 1)

    raw = tokenizer._sp  # the bare SentencePieceProcessor: the baseline encodes the same documents
    prep_ours, prep_raw = (n_tokens / seconds for seconds in _best_of(
        args.repeats, ours, lambda: raw.encode(texts, num_threads=1)))

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

    print(f"corpus: demo {args.demo_mb} MB, {len(docs)} documents, {n_tokens} tokens, "
          f"vocab {tokenizer.vocab_size}, seq_len {args.seq_len}, {len(samples)} loader samples")
    print(f"| {'measure':<32} | {'ours':>12} | {'baseline':>12} | {'ours/baseline':>13} |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 14}|{'-' * 15}|")
    print(f"| {'prep tokens/s (1 core)':<32} | {prep_ours:>12,.0f} | {prep_raw:>12,.0f} | "
          f"{prep_ours / prep_raw:>13.2f} |")
    print(f"| {'loader samples/s':<32} | {load_ours:>12,.0f} | {load_plain:>12,.0f} | "
          f"{load_ours / load_plain:>13.2f} |")
    print("baselines: raw SentencePieceProcessor.encode of the same documents; "
          "webdataset.WebDataset(...).decode() over the same shards")


if __name__ == "__main__":
    main()
