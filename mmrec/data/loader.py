"""ShardLoader: streams prepared shards (path or s3://) as training batches, resumable exactly.

Positions are counted in GLOBAL samples within the epoch. One optimizer-visible step of all
ranks consumes world_size * micro_batch_size consecutive global positions; rank r takes the
contiguous slice [P + r*m, P + (r+1)*m). So 2 ranks x micro m and 1 rank x micro 2m read the
same global batches, and a run saved at position P resumes at P with any world size.

Every rank reads every shard it needs (and keeps only its rows): simple, and at LM token rates the
extra reads are far below what object storage serves. One shard per domain is held in memory,
with the next one fetched in a background thread.
"""
from __future__ import annotations

import concurrent.futures
import logging
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from core import storage
from core.manifest import Manifest, load_manifest, manifest_dir
from core.shards import CorruptShardError, read_shard
from mmrec.data.order import DomainOrder, MixSchedule

log = logging.getLogger(__name__)
STATE_VERSION = 1


class ShardLoader:
    """Iterate from the saved position: across epochs when `infinite` (what the Trainer wants),
    else to the end of the current epoch, after which the epoch advances by itself.

    batch = dict(tokens=LongTensor [micro_batch_size, seq_len + 1], domains=list[str]).
    """

    def __init__(self, manifest_url: str, domains: dict[str, float] | Sequence[str] = ("text", "code"),
                 *, split: str = "train", micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, on_corrupt: str = "raise",
                 every_batch_has_all_domains: bool = False, mix_block: int | None = None,
                 on_corrupt_shard: Callable[[str, str], None] | None = None,
                 prefetch: bool = True, infinite: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        weights = dict(domains) if isinstance(domains, dict) else {d: 1.0 for d in domains}
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError(f"domains must name at least one domain with a positive weight, "
                             f"got {domains!r}")
        self.manifest_url = manifest_url
        self.manifest: Manifest = load_manifest(manifest_url)
        self.root = manifest_dir(manifest_url)
        self.split, self.seed = split, seed
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.on_corrupt, self.on_corrupt_shard = on_corrupt, on_corrupt_shard
        self.every_batch_has_all_domains = every_batch_has_all_domains
        self.infinite = infinite
        self.weights = {d: float(w) / sum(weights.values()) for d, w in sorted(weights.items())}
        self.shards = {}
        for domain in self.weights:
            selected = self.manifest.select(domain, split)
            if not sum(s.samples for s in selected):
                have = sorted({(s.domain, s.split) for s in self.manifest.shards})
                raise ValueError(f"{manifest_url} has no {domain}/{split} samples (it has {have}): "
                                 f"prepare more data or pick other domains/split")
            self.shards[domain] = selected
        self._mix_block_explicit = mix_block is not None
        self._set_mix_block(mix_block or micro_batch_size)
        self.epoch, self.offset = 0, 0
        self.corrupt_shards: list[str] = []
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._pending: dict[tuple[str, int], concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(2) if prefetch else None
        self._orders: dict[str, DomainOrder] = {}
        self._orders_key = None

    # --- configuration -------------------------------------------------------------------

    def _set_mix_block(self, block: int) -> None:
        if self.micro_batch_size % block:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be a multiple of "
                             f"mix_block={block} so every batch holds whole mix blocks")
        self.mix_block = block
        self.schedule = MixSchedule(self.weights, block, seed=self.seed,
                                    every_block_has_all=self.every_batch_has_all_domains)

    @property
    def tokenizer_url(self) -> str:
        return storage.join(self.root, self.manifest.tokenizer_path)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def _domain_orders(self) -> dict[str, DomainOrder]:
        key = (self.epoch, tuple(self.corrupt_shards))
        if self._orders_key != key:
            excluded = frozenset(self.corrupt_shards)
            self._orders = {d: DomainOrder([s.path for s in shards], [s.samples for s in shards],
                                           seed=self.seed, epoch=self.epoch, domain=d,
                                           excluded=excluded)
                            for d, shards in self.shards.items()}
            self._orders_key = key
        return self._orders

    def epoch_samples(self) -> int:
        """Global positions in the current epoch: whole mix blocks no domain runs out of.

        Counted over all shards, skipped corrupt ones included, so a run and its resumption agree
        on the epoch length; a stream short of samples wraps around instead (DomainOrder.locate).
        """
        available = {d: sum(s.samples for s in shards) for d, shards in self.shards.items()}
        return self.schedule.blocks_available(available) * self.mix_block

    def batches_per_epoch(self) -> int:
        """Batches every rank yields for a whole epoch (equal on all ranks: DDP needs that)."""
        return self.epoch_samples() // (self.world_size * self.micro_batch_size)

    # --- shard reading -------------------------------------------------------------------

    def _fetch(self, domain: str, shard: int) -> np.ndarray:
        info = self.shards[domain][shard]
        return read_shard(storage.read_bytes(storage.join(self.root, info.path)), name=info.path,
                          expected_sha256=info.sha256, expected_samples=info.samples,
                          sample_tokens=self.manifest.sample_tokens)

    def _rows_of(self, domain: str, shard: int) -> np.ndarray:
        key = (domain, shard)
        if key not in self._cache:
            future = self._pending.pop(key, None)
            rows = future.result() if future is not None else self._fetch(domain, shard)
            for old in [k for k in self._cache if k[0] == domain]:
                del self._cache[old]
            self._cache[key] = rows
            self._prefetch_after(domain, shard)
        return self._cache[key]

    def _prefetch_after(self, domain: str, shard: int) -> None:
        order = self._domain_orders()[domain]
        if self._pool is None or shard not in order.shards:
            return
        position = order.shards.index(shard) + 1
        if position < len(order.shards):
            key = (domain, order.shards[position])
            if key not in self._pending and key not in self._cache:
                self._pending[key] = self._pool.submit(self._fetch, *key)

    def _sample(self, domain: str, k: int) -> np.ndarray:
        while True:
            shard, row = self._domain_orders()[domain].locate(k)
            try:
                return self._rows_of(domain, shard)[row]
            except CorruptShardError as exc:
                self._handle_corrupt(domain, shard, exc)

    def _handle_corrupt(self, domain: str, shard: int, exc: CorruptShardError) -> None:
        path = self.shards[domain][shard].path
        if self.on_corrupt == "raise":
            raise CorruptShardError(f"{exc}. Re-run prep to rewrite it, or construct the loader "
                                    f"with on_corrupt='skip' to train without it") from None
        warnings.warn(f"skipping corrupt shard: {exc}", RuntimeWarning, stacklevel=3)
        self.corrupt_shards.append(path)
        if self.on_corrupt_shard is not None:
            self.on_corrupt_shard(path, str(exc))

    # --- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.batches_per_epoch() == 0:
                raise ValueError(f"an epoch of {self.epoch_samples()} samples is less than one step of "
                                 f"world_size*micro_batch_size={self.world_size * self.micro_batch_size}: "
                                 f"prepare more data or use smaller batches")
            yield from self._epoch()
            if not self.infinite:
                return

    def _epoch(self) -> Iterator[dict]:
        step = self.world_size * self.micro_batch_size
        end = self.epoch_samples()
        while self.offset + step <= end:
            first = self.offset + self.rank * self.micro_batch_size
            rows, domains = [], []
            for position in range(first, first + self.micro_batch_size):
                domain, k = self.schedule.locate(self.epoch, position)
                rows.append(self._sample(domain, k))
                domains.append(domain)
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            # The batch is handed over now: a checkpoint taken after training on it resumes
            # with the next one.
            self.offset += step
            yield {"tokens": tokens, "domains": domains}
        self.epoch += 1
        self.offset = 0

    # --- checkpoint state ----------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "global_offset": self.offset,
                "seed": self.seed, "split": self.split, "weights": dict(self.weights),
                "mix_block": self.mix_block, "fingerprint": self.fingerprint,
                "corrupt_shards": list(self.corrupt_shards)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"the checkpoint's data position belongs to another dataset "
                             f"(fingerprint {str(state.get('fingerprint'))[:12]}..., this manifest "
                             f"{self.fingerprint[:12]}...): resume with the manifest the run started "
                             f"with, or start a new run")
        for field, mine in (("seed", self.seed), ("split", self.split), ("weights", self.weights)):
            if state.get(field) != mine:
                raise ValueError(f"the checkpoint's data {field} is {state.get(field)!r}, this "
                                 f"loader has {mine!r}: use the same {field} to resume exactly")
        if state["mix_block"] != self.mix_block:
            if self._mix_block_explicit:
                raise ValueError(f"the checkpoint used mix_block={state['mix_block']}, this "
                                 f"loader mix_block={self.mix_block}: they must match")
            self._set_mix_block(state["mix_block"])
        self.corrupt_shards = list(state.get("corrupt_shards", []))
        self.epoch, self.offset = int(state["epoch"]), int(state["global_offset"])
        self._cache.clear()
        self._pending.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
