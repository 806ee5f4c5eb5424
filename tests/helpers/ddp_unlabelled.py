"""Run by tests/test_bad_data.py: 2-process DDP on CPU (gloo), batches of 4 rows per rank, in which

* step 1: no rank's batch has a label -> every rank skips (no update, no hang);
* step 2: only rank 1's batch is unlabelled -> both ranks step (rank 1 with a zero loss).

Each rank writes its parameters after each step, its skipped count and step count to OUT_DIR/rank<R>.pt.
Usage: python ddp_unlabelled.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.data import MultiTaskCollator

TASKS = [Task("risk", kind="binary"), Task("stay", kind="regression")]
# (rank, step) -> labelled; step 0: both labelled, 1: none, 2: rank 0 only, 3: both
LABELLED = {(0, 0): True, (1, 0): True, (0, 1): False, (1, 1): False, (0, 2): True, (1, 2): False}


class PerRank(Dataset):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, object]:
        step = i // 4
        row: dict[str, object] = {"x": [0.1 * i + self.rank, 1.0, -1.0, 0.5]}
        if LABELLED.get((self.rank, step), True):
            row |= {"risk": float(i % 2), "stay": float(i + self.rank)}
        return row


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.params.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


class Module(MultiTaskModule):
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return DataLoader(PerRank(rank), batch_size=4, shuffle=False, collate_fn=MultiTaskCollator(TASKS))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = Module(MLPBackbone(4, [8]), TASKS, balancer="uncertainty")
    snaps = Snapshots()
    trainer = L.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[snaps],
    )
    trainer.fit(module)
    torch.save(
        {"params": snaps.params, "skipped": module.skipped_batches, "steps": trainer.global_step},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
