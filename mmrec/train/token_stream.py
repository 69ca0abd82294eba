"""An in-memory loader implementing the Batches contract, for tests and the smoke job.

Token arrays are cut into non-overlapping samples of seq_len + 1 tokens. The global sample order of
an epoch depends only on (seed, epoch); rank r of W takes its local_batch slice of each global batch,
so the order does not depend on the number of ranks. The position (epoch, global offset) and a
fingerprint of the data are what state_dict() saves.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch


class TokenStream:
    def __init__(
        self,
        domains: Mapping[str, np.ndarray],  # domain name -> 1-D token ids
        *,
        seq_len: int,
        local_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"TokenStream: rank {rank} is outside world_size {world_size}")
        if seq_len < 1 or local_batch < 1:
            raise ValueError(f"TokenStream: seq_len ({seq_len}) and local_batch ({local_batch}) must be >= 1")
        sample_len = seq_len + 1
        pieces, labels, digest = [], [], hashlib.sha256(f"seq_len={seq_len}".encode())
        for name in sorted(domains):
            ids = np.asarray(domains[name], dtype=np.int64)
            if ids.ndim != 1:
                raise ValueError(f"TokenStream: domain {name!r} must be a 1-D token array, got shape {ids.shape}")
            count = len(ids) // sample_len
            pieces.append(ids[: count * sample_len].reshape(count, sample_len))
            labels += [name] * count
            digest.update(name.encode() + b"\0" + ids.tobytes())
        self.samples = np.concatenate(pieces) if pieces else np.zeros((0, sample_len), np.int64)  # [N, seq_len+1]
        self.domains = labels
        self.global_batch = local_batch * world_size
        if len(self.samples) < self.global_batch:
            raise ValueError(
                f"TokenStream: {len(self.samples)} samples of {sample_len} tokens cannot fill one global batch of "
                f"{self.global_batch}; provide more tokens or lower seq_len/batch size"
            )
        self.fingerprint = digest.hexdigest()
        self.seq_len, self.local_batch, self.seed = seq_len, local_batch, seed
        self.shuffle, self.infinite, self.rank = shuffle, infinite, rank
        self.epoch, self.offset = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.samples) // self.global_batch  # the incomplete tail of an epoch is dropped

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def __iter__(self) -> Iterator[dict]:
        order = self._order(self.epoch)
        while True:
            if self.offset + self.global_batch > len(self.samples):
                if not self.infinite:
                    self.epoch, self.offset = self.epoch + 1, 0
                    return
                self.epoch, self.offset = self.epoch + 1, 0
                order = self._order(self.epoch)
            start = self.offset + self.rank * self.local_batch
            picked = order[start : start + self.local_batch]
            # Advance before yielding: a checkpoint taken after this batch was consumed resumes after it.
            self.offset += self.global_batch
            yield dict(tokens=torch.from_numpy(self.samples[picked]), domains=[self.domains[i] for i in picked])

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, offset=self.offset, fingerprint=self.fingerprint, seed=self.seed)

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "TokenStream.load_state_dict: the checkpoint was taken on different data (fingerprint "
                f"{state.get('fingerprint')!r} != {self.fingerprint!r}); resume with the same corpus and seq_len"
            )
        if state.get("seed") != self.seed:
            raise ValueError(f"TokenStream.load_state_dict: checkpoint seed {state.get('seed')} != loader seed {self.seed}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
