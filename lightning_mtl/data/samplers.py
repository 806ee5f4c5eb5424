"""Samplers for multi-task data."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler[int]):
    """Base of samplers whose order is a function of ``(seed, epoch, cycle)`` and whose position is saved.

    ``set_epoch`` (Lightning calls it every epoch) sets the epoch and restarts the cycle count; every
    ``iter`` starts a new cycle, so a loader cycled within an epoch (``CombinedLoader`` in
    ``max_size_cycle`` mode), or a plain loader that never calls ``set_epoch``, gets a new order each time.
    The order of ``(epoch, cycle)`` is drawn from ``seed + epoch + cycle``.

    ``state_dict()`` holds the epoch and cycle of the order in progress and how many of its indices were
    handed out; after ``load_state_dict`` the next ``iter`` yields exactly the rest of that order.
    ``torchdata``'s ``StatefulDataLoader`` saves and restores it with the loader, Lightning with the
    checkpoint. A ``set_epoch`` to another epoch drops a restored position not yet used (the checkpoint was
    taken at the end of an epoch: the next one starts afresh). Subclasses implement ``_permutation``.

    Distributed by itself: rank ``r`` of ``num_replicas`` (default: from the initialised process group, else
    one process) takes every ``num_replicas``-th index of the order from ``r`` (padded by repetition like
    ``DistributedSampler``), which keeps neighbours together. Being a ``DistributedSampler``, Lightning
    does not wrap it, so its state (cycles included) is saved and restored on every rank.

    Example:
        >>> order = list(ShuffleSampler(5, seed=0))
        >>> ranks = [list(ShuffleSampler(5, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
        >>> ranks == [(order + order[:1])[0::2], (order + order[:1])[1::2]]
        True
    """

    def __init__(
        self, size: int, seed: int = 0, *, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        group = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if group else 1)
        rank = rank if rank is not None else (dist.get_rank() if group else 0)
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)  # type: ignore[arg-type]
        self.size = size
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.cycle = 0  # the cycle of the next order
        self._current = (0, 0)  # (epoch, cycle) of the order in progress
        self._yielded = 0  # indices of the order in progress handed out so far (0: none in progress)
        self._run = 0  # which iterator counts: older ones stop updating the position
        self._restored: int | None = None  # indices the next order skips (set by ``load_state_dict``)

    def set_epoch(self, epoch: int) -> None:
        """A new order per epoch (called by Lightning's loops); a restored position of that epoch is kept."""
        if self._restored is not None and epoch == self.epoch:
            return
        self.epoch, self.cycle, self._restored = epoch, 0, None

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        """Where the order in progress stands: ``seed``, ``epoch``, ``cycle`` (of that order) and ``yielded``."""
        if self._restored is not None:
            epoch, cycle, yielded = self.epoch, self.cycle, self._restored
        elif self._yielded:
            (epoch, cycle), yielded = self._current, self._yielded
        else:
            epoch, cycle, yielded = self.epoch, self.cycle, 0
        return {"seed": self.seed, "epoch": epoch, "cycle": cycle, "yielded": yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next ``iter`` yield the rest of the order that ``state`` was taken from."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"{type(self).__name__}: the saved state has seed={state['seed']} but this sampler has "
                f"seed={self.seed}; resume with the seed of the interrupted run."
            )
        self.epoch, self.cycle = int(state["epoch"]), int(state["cycle"])
        self._restored, self._yielded = int(state["yielded"]), 0

    def __iter__(self) -> Iterator[int]:
        # lazy: the order is drawn at the first ``next``, after Lightning's ``set_epoch`` (which comes after
        # the loader's iterator is created)
        self._run += 1
        run = self._run
        for i in self._remaining():
            if run == self._run:
                self._yielded += 1
            yield i
        if run == self._run:
            self._yielded = 0  # the order is used up: the next state starts a fresh one

    def _remaining(self) -> Iterator[int]:
        self._current = (self.epoch, self.cycle)
        order = self._permutation(torch.Generator().manual_seed(self.seed + self.epoch + self.cycle))
        if self.num_replicas > 1:
            order = (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size]
            order = order[self.rank : self.total_size : self.num_replicas]
        self.cycle += 1
        skip, self._restored = self._restored or 0, None
        self._yielded = skip
        yield from order[skip:]

    def _permutation(self, g: torch.Generator) -> list[int]:
        raise NotImplementedError


class ShuffleSampler(ResumableSampler):
    """A random permutation of ``range(size)`` per epoch and cycle; resumable (see :class:`ResumableSampler`).

    Example:
        >>> s = ShuffleSampler(6, seed=1)
        >>> it = iter(s)
        >>> head = [next(it), next(it)]
        >>> state = s.state_dict()
        >>> state
        {'seed': 1, 'epoch': 0, 'cycle': 0, 'yielded': 2}
        >>> resumed = ShuffleSampler(6, seed=1)
        >>> resumed.load_state_dict(state)
        >>> list(resumed) == list(it)
        True
    """

    def _permutation(self, g: torch.Generator) -> list[int]:
        return torch.randperm(self.size, generator=g).tolist()


class LengthGroupedSampler(ResumableSampler):
    """Random order in which neighbours have similar lengths, so dynamically padded batches waste little.

    Each epoch: shuffle all indices, cut them into chunks of ``batch_size * chunk_batches``, sort each
    chunk by length (longest first), cut it into batches and shuffle the batches. Consecutive
    ``batch_size`` indices then form a batch of similar lengths (``DataLoader(batch_size=...)`` as
    usual). Under DDP each rank takes every world_size-th index, which keeps the grouping.

    Resumable (see :class:`ResumableSampler`).

    Example:
        >>> s = LengthGroupedSampler([5, 1, 6, 2, 8, 3, 7, 4], batch_size=2, chunk_batches=4, seed=0)
        >>> order = list(s)
        >>> sorted(order) == list(range(8))
        True
        >>> [abs(s.lengths[a] - s.lengths[b]) <= 1 for a, b in zip(order[::2], order[1::2])]
        [True, True, True, True]
        >>> it = iter(s)
        >>> head = [next(it) for _ in range(3)]
        >>> state = s.state_dict()
        >>> rest = list(it)
        >>> s2 = LengthGroupedSampler(s.lengths, batch_size=2, chunk_batches=4, seed=0)
        >>> s2.load_state_dict(state)
        >>> list(s2) == rest
        True
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        chunk_batches: int = 50,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(
                f"batch_size and chunk_batches must be >= 1, got {batch_size} and {chunk_batches}."
            )
        super().__init__(len(lengths), seed, num_replicas=num_replicas, rank=rank)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.chunk = batch_size * chunk_batches

    def _permutation(self, g: torch.Generator) -> list[int]:
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(perm), self.chunk):
            chunk = sorted(perm[start : start + self.chunk], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [i for b in order for i in batches[b]]
