"""The global sample order: a pure function of (seed, epoch) and the manifest.

Two layers, both random-access so a resumed run can jump straight to any global position:
  * DomainOrder: inside one domain, shards are permuted per (seed, epoch), and the samples of
    each shard are permuted per (seed, epoch, shard). Sample k of the domain stream lives in
    exactly one (shard, row).
  * MixSchedule: the mixed stream is cut into blocks of `block` positions. Block b holds a fixed
    number of samples of each domain (cumulative counts follow the weights exactly, up to
    rounding) in an order shuffled per (seed, epoch, b). Position i maps to (domain, k).
Nothing here depends on ranks, workers or batch sizes, which is what lets a run resume with a
different world size and still see every sample once.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def stable_id(name: str) -> int:
    return zlib.crc32(name.encode())


class DomainOrder:
    """Order of one domain's samples in one epoch. `excluded` shards (corrupt) are left out
    without disturbing the order of the others."""

    def __init__(self, shard_paths: Sequence[str], shard_samples: Sequence[int], *, seed: int,
                 epoch: int, domain: str, excluded: frozenset[str] = frozenset()):
        self.seed, self.epoch, self.domain = seed, epoch, domain
        permuted = _rng(seed, epoch, stable_id(domain)).permutation(len(shard_paths))
        self.shards = [int(s) for s in permuted if shard_paths[s] not in excluded]
        self.paths = list(shard_paths)
        counts = np.array([shard_samples[s] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # [n_kept + 1]
        self.total = int(self.starts[-1])
        self._sizes = {shard: int(shard_samples[shard]) for shard in self.shards}
        self._row_permutations: dict[int, np.ndarray] = {}

    def locate(self, k: int) -> tuple[int, int]:
        """(shard index in the manifest list, row inside the shard) of domain sample k.

        k past the end wraps around: that only happens after corrupt shards were skipped mid-epoch,
        and wrapping keeps every rank producing the same number of batches.
        """
        if self.total == 0:
            raise ValueError(f"domain {self.domain!r} has no readable samples left")
        k %= self.total
        position = int(np.searchsorted(self.starts, k, side="right")) - 1
        shard = self.shards[position]
        row = k - int(self.starts[position])
        return shard, int(self.row_permutation(shard)[row])

    def row_permutation(self, shard: int) -> np.ndarray:
        permutation = self._row_permutations.get(shard)
        if permutation is None:
            permutation = _rng(self.seed, self.epoch, stable_id(self.domain),
                               stable_id(self.paths[shard])).permutation(self._sizes[shard])
            self._row_permutations = {shard: permutation}  # rows are read shard by shard
        return permutation


class MixSchedule:
    """Which domain fills each position of the mixed stream; exact weights per block."""

    def __init__(self, weights: dict[str, float], block: int, *, seed: int,
                 every_block_has_all: bool):
        if block < 1:
            raise ValueError(f"mix block must be >= 1, got {block}")
        total = sum(weights.values())
        self.domains = sorted(weights)
        self.weights = {d: weights[d] / total for d in self.domains}
        self.block, self.seed = block, seed
        self._cached_block: tuple = (None, None, None, None)
        # The heaviest domain takes the rounding remainder; the others follow floor(n * w).
        self.majority = max(self.domains, key=lambda d: (self.weights[d], d))
        if every_block_has_all and len(self.domains) > 1:
            minority_ok = all(block * self.weights[d] >= 1 for d in self.domains
                              if d != self.majority)
            if not minority_ok or block * self.weights[self.majority] < len(self.domains):
                raise ValueError(f"cannot put every domain in each batch of {block} samples with "
                                 f"weights {self.weights}: raise micro_batch_size or mix_block")

    def cumulative(self, blocks: int) -> dict[str, int]:
        """Samples of each domain in the first `blocks` blocks."""
        n = blocks * self.block
        counts = {d: math.floor(n * self.weights[d] + 1e-9) for d in self.domains
                  if d != self.majority}
        counts[self.majority] = n - sum(counts.values())
        return counts

    def layout(self, epoch: int, b: int) -> list[str]:
        before, after = self.cumulative(b), self.cumulative(b + 1)
        slots = [d for d in self.domains for _ in range(after[d] - before[d])]
        order = _rng(self.seed, epoch, b, 0x6D6978).permutation(len(slots))
        return [slots[i] for i in order]

    def locate(self, epoch: int, position: int) -> tuple[str, int]:
        """(domain, index k in that domain's stream) of global position `position`."""
        b, j = divmod(position, self.block)
        if self._cached_block[:2] != (epoch, b):  # a batch reads a block's positions in a row
            self._cached_block = (epoch, b, self.layout(epoch, b), self.cumulative(b))
        _, _, layout, before = self._cached_block
        domain = layout[j]
        return domain, before[domain] + layout[:j].count(domain)

    def blocks_available(self, available: dict[str, int]) -> int:
        """Largest number of whole blocks that no domain runs out of."""
        low, high = 0, 1
        while all(self.cumulative(high)[d] <= available[d] for d in self.domains):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if all(self.cumulative(middle)[d] <= available[d] for d in self.domains):
                low = middle
            else:
                high = middle
        return low
