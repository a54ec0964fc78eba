"""Which images a training step sees: a pure function of (seed, domain, step, rank).

Global sample k of a domain (k = step * world_batch + rank * batch + b) is image
perm_e[k mod n] of epoch e = k // n, where perm_e is a permutation seeded by (seed, domain, e);
its augmentation is seeded by k. So a run resumed at step s draws exactly the images and
augmentations an uninterrupted run would, with no sampler state to save, and the ranks of a
distributed run split every epoch's permutation without overlap (what DistributedSampler does,
except that it can start in the middle of an epoch).
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

_DOMAIN_SALT = {"source": 0x5EED_0001, "target": 0x5EED_0002}


class StepBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields, for steps ``start_step, start_step + 1, ...``, the batch of (index, sample_seed)
    keys this rank loads (``AugmentedDataset`` takes such keys)."""

    def __init__(self, num_images: int, batch_size: int, *, seed: int, domain: str, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_images < 1:
            raise ValueError(f"the {domain} dataset is empty")
        if domain not in _DOMAIN_SALT:
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_images, self.batch_size, self.seed, self.domain = num_images, batch_size, seed, domain
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + _DOMAIN_SALT[self.domain]) * 7919 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_images, generator=generator), epoch
        return self._perm

    def keys_for_step(self, step: int) -> List[Tuple[int, int]]:
        first = (step * self.world_size + self.rank) * self.batch_size
        keys = []
        for k in range(first, first + self.batch_size):
            epoch, position = divmod(k, self.num_images)
            keys.append((int(self._permutation(epoch)[position]), k))
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.keys_for_step(step)
            step += 1
