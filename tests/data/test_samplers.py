"""LengthGroupedSampler: a permutation per epoch, batches of similar length, less padding in the data module."""

from __future__ import annotations

import torch
from datasets import Dataset

from lightning_mtl import MultiTaskDataModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM
from lightning_mtl.data.samplers import LengthGroupedSampler


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
