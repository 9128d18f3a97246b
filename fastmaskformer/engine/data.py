"""Training and validation loaders whose order and augmentation depend only on (seed, epoch, index).

That makes a resumed run see exactly the batches an uninterrupted one would: the sampler is a
``DistributedSampler`` (this rank's share of a permutation seeded by seed + epoch) that can start
at an offset inside its epoch, and each sample's random augmentation runs from its own seed,
whatever the number of workers and without touching the training process's random streams.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import random
from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data import collate


class ResumableSampler(Sampler):
    """Indices of one rank's share of the epoch's permutation, from position ``start`` on."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                        drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.start, None)

    def __len__(self) -> int:
        return len(self.inner) - self.start


@contextlib.contextmanager
def _seeded(*key: int):
    """Seed python, numpy and torch from ``key`` inside the block; restore their states after."""
    py, npy = random.getstate(), np.random.get_state()
    seed = np.random.SeedSequence(list(key)).generate_state(1)[0]
    with torch.random.fork_rng(devices=[]):
        random.seed(int(seed))
        np.random.seed(int(seed))
        torch.manual_seed(int(seed))
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class EpochSeeded(Dataset):
    """``dataset[i]`` with its random augmentation seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict:
        with _seeded(self.seed, self.epoch, i):
            return self.dataset[i]


class TrainBatches:
    """Endless training batches of ``batch_size`` per rank, positioned by iteration number."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int,
                 size_divisibility: int, ignore_label: int, pin_memory: bool = False):
        self.dataset = EpochSeeded(dataset, seed)
        self.sampler = ResumableSampler(dataset, rank, world_size, seed)
        self.batch_size, self.seed, self.num_workers, self.pin_memory = batch_size, seed, num_workers, pin_memory
        self.collate = functools.partial(collate, size_divisibility=size_divisibility, ignore_label=ignore_label)
        self.iters_per_epoch = len(self.sampler.inner) // batch_size
        if self.iters_per_epoch == 0:
            raise ValueError(f"dataset: {len(dataset)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} processes")

    def position(self, iteration: int) -> Tuple[int, int]:
        """(epoch, samples of this rank already consumed in it) before ``iteration``."""
        epoch, step = divmod(iteration, self.iters_per_epoch)
        return epoch, step * self.batch_size

    def from_iteration(self, iteration: int) -> Iterator[Dict]:
        epoch, start = self.position(iteration)
        while True:
            self.sampler.set_epoch(epoch, start)
            self.dataset.epoch = epoch
            # An explicit generator: creating the loader's iterator draws the workers' base seed
            # from it instead of from the global torch stream (which a resume must not shift).
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                num_workers=self.num_workers, collate_fn=self.collate, pin_memory=self.pin_memory,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, start = epoch + 1, 0


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ...: every image evaluated exactly once over all ranks
    (DistributedSampler would repeat some to even the shards out, counting them twice)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def val_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
               size_divisibility: int, ignore_label: int) -> DataLoader:
    """This rank's shard of the validation set, in order (the evaluators sum their statistics over ranks)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=num_workers,
                      collate_fn=functools.partial(collate, size_divisibility=size_divisibility,
                                                   ignore_label=ignore_label))
