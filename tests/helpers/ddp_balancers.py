"""Run by tests/balancing/test_ddp_balancers.py: every balancer variant under 2-process DDP on CPU (gloo).

Two scenarios per variant, each a short ``Trainer.fit`` in the same process group:
* ``same``: every task labelled on both ranks (compared with single-process training on the global batch);
* ``absent``: the regression task has no labels on rank 1 at all (ranks see different task sets).
Each rank writes ``OUT_DIR/<variant>-<scenario>-rank<R>.pt`` with its final parameters.
Usage: python ddp_balancers.py OUT_DIR [VARIANT_INDEX ...]
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TABULAR_TASKS, DictDataset, balancer_variants, toy_tabular

from lightning_mtl import MultiTaskModule
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import create_balancer

PER_RANK_BATCH = 8
N = 32  # 2 steps an epoch on each rank


def build(name: str, kwargs: dict) -> MultiTaskModule:
    torch.manual_seed(0)
    balancer = create_balancer({"name": name, **kwargs})
    return MultiTaskModule(
        MLPBackbone(8, hidden=(32, 16), dropout=0.0), TABULAR_TASKS, balancer=balancer, lr=1e-2
    )


def dataset(scenario: str) -> DictDataset:
    data = toy_tabular(N)
    if scenario == "absent":
        stay = data["stay"].clone()
        stay[1::2] = float("nan")  # DistributedSampler(shuffle=False) gives rank 1 the odd indices
        data["stay"] = stay
    return DictDataset(data)


class InterleavedData(L.LightningDataModule):
    """Rank r reads examples r, r+2, ... in order: together the ranks read the single-process batches."""

    def __init__(self, ds: DictDataset) -> None:
        super().__init__()
        self.ds = ds

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = torch.utils.data.DistributedSampler(
            self.ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(self.ds, batch_size=PER_RANK_BATCH, sampler=sampler)


def variant_id(name: str, kwargs: dict) -> str:
    return name + "".join(f"-{v}" for v in kwargs.values())


def main(out_dir: str, *indices: str) -> None:
    torch.set_num_threads(1)
    variants = balancer_variants()
    chosen = [variants[int(i)] for i in indices] if indices else variants
    for name, kwargs in chosen:
        for scenario in ("same", "absent"):
            module = build(name, kwargs)
            data = InterleavedData(dataset(scenario))
            trainer = L.Trainer(
                use_distributed_sampler=False,
                strategy="ddp",
                devices=2,
                accelerator="cpu",
                max_epochs=3,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(module, data)
            flat = torch.cat([p.detach().flatten().float() for p in module.parameters()])
            torch.save(
                {"params": flat, "steps": trainer.global_step, "world_size": trainer.world_size},
                os.path.join(out_dir, f"{variant_id(name, kwargs)}-{scenario}-rank{trainer.global_rank}.pt"),
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
