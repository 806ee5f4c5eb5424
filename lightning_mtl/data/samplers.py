"""Samplers for multi-task data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Random order in which neighbours have similar lengths, so dynamically padded batches waste little.

    Each epoch: shuffle all indices, cut them into chunks of ``batch_size * chunk_batches``, sort each
    chunk by length (longest first), cut it into batches and shuffle the batches. Consecutive
    ``batch_size`` indices then form a batch of similar lengths (``DataLoader(batch_size=...)`` as
    usual). Under DDP, Lightning wraps this sampler and each rank takes every world_size-th index, which
    keeps the grouping.

    Example:
        >>> s = LengthGroupedSampler([5, 1, 6, 2, 8, 3, 7, 4], batch_size=2, chunk_batches=4, seed=0)
        >>> order = list(s)
        >>> sorted(order) == list(range(8))
        True
        >>> [abs(s.lengths[a] - s.lengths[b]) <= 1 for a, b in zip(order[::2], order[1::2])]
        [True, True, True, True]
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, chunk_batches: int = 50, seed: int = 0
    ) -> None:
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(
                f"batch_size and chunk_batches must be >= 1, got {batch_size} and {chunk_batches}."
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.chunk = batch_size * chunk_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new order per epoch (called by Lightning's loops)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # plain DataLoaders never call set_epoch; still give each epoch its own order
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(perm), self.chunk):
            chunk = sorted(perm[start : start + self.chunk], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([i for b in order for i in batches[b]])
