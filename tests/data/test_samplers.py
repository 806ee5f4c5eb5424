"""LengthGroupedSampler: a permutation per epoch, batches of similar length, less padding in the data module;
resumable samplers: a restored state yields exactly the rest of the order; DDP sharding."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from lightning_mtl import MultiTaskDataModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM
from lightning_mtl.data.samplers import LengthGroupedSampler, ShuffleSampler


def test_each_epoch_is_a_new_permutation_with_grouped_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=10, chunk_batches=20, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != second

    def spread(order):
        return sum(
            max(lengths[i] for i in order[k : k + 10]) - min(lengths[i] for i in order[k : k + 10])
            for k in range(0, 1000, 10)
        )

    random_order = torch.randperm(1000, generator=g).tolist()
    assert spread(first) < 0.2 * spread(random_order)
    sampler.set_epoch(5)
    again = LengthGroupedSampler(lengths, batch_size=10, chunk_batches=20, seed=3)
    again.set_epoch(5)
    assert list(sampler) == list(again)  # deterministic given seed and epoch


def test_datamodule_groups_training_batches_by_length():
    texts = [" ".join(["word"] * (1 + (i * 7) % 60)) for i in range(400)]
    ds = Dataset.from_dict({"text": texts, "y": [i % 2 for i in range(400)]})
    tasks = [Task("y", kind="binary")]

    def padding(group: bool) -> int:
        dm = MultiTaskDataModule(
            {"y": ds}, tasks, tokenizer=PACKAGED_MINILM, batch_size=16, group_by_length=group
        )
        dm.setup("fit")
        total = 0
        for batch, _, _ in dm.train_dataloader():
            mask = batch["y"]["attention_mask"]
            total += int((mask == 0).sum())
        return total

    assert padding(True) < 0.25 * padding(False)


# --- resumable state ----------------------------------------------------------------------------------


def _rest_after(sampler_factory, cycles_done: int, taken: int) -> tuple[list[int], dict]:
    """Run ``cycles_done`` full orders and ``taken`` indices of the next; return the rest and the state."""
    s = sampler_factory()
    for _ in range(cycles_done):
        list(s)
    it = iter(s)
    for _ in range(taken):
        next(it)
    state = s.state_dict()
    return list(it), state


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ShuffleSampler(11, seed=3),
        lambda: LengthGroupedSampler(list(range(11)), 2, chunk_batches=2, seed=3),
    ],
    ids=["shuffle", "length_grouped"],
)
@pytest.mark.parametrize(("cycles_done", "taken"), [(0, 4), (1, 1), (2, 10)])
def test_restored_sampler_yields_exactly_the_rest(factory, cycles_done, taken):
    rest, state = _rest_after(factory, cycles_done, taken)
    assert state["cycle"] == cycles_done and state["yielded"] == taken
    fresh = factory()
    fresh.load_state_dict(state)
    fresh.set_epoch(0)  # Lightning's set_epoch of the same epoch keeps the restored position
    assert list(fresh) == rest
    assert list(fresh) == list(
        iter(_cycle(factory, cycles_done + 1))
    )  # then the next cycle, as uninterrupted


def _cycle(factory, n: int):
    s = factory()
    for _ in range(n):
        list(s)
    return s


def test_set_epoch_of_another_epoch_drops_the_restored_position():
    s = ShuffleSampler(8, seed=0)
    it = iter(s)
    next(it)
    state = s.state_dict()
    fresh = ShuffleSampler(8, seed=0)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # the checkpoint ended epoch 0: epoch 1 starts afresh
    expected = ShuffleSampler(8, seed=0)
    expected.set_epoch(1)
    assert list(fresh) == list(expected) and len(list(expected)) == 8


def test_restored_state_with_another_seed_is_refused():
    s = ShuffleSampler(8, seed=0)
    with pytest.raises(
        ValueError, match=r"ShuffleSampler: the saved state has seed=1 but this sampler has seed=0"
    ):
        s.load_state_dict({"seed": 1, "epoch": 0, "cycle": 0, "yielded": 2})


def test_ranks_take_every_world_size_th_index_of_one_order():
    lengths = [5, 1, 6, 2, 8, 3, 7]
    full = list(LengthGroupedSampler(lengths, 2, chunk_batches=4, seed=0))
    ranks = [
        list(LengthGroupedSampler(lengths, 2, chunk_batches=4, seed=0, num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    padded = full + full[:1]  # 7 indices over 2 ranks: padded to 8 like DistributedSampler
    assert ranks == [padded[0::2], padded[1::2]]
    assert len(LengthGroupedSampler(lengths, 2, num_replicas=2, rank=1)) == 4
