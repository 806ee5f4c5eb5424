"""Run by tests/test_ddp.py: 2-process DDP on CPU (gloo) with two heterogeneous text tasks.

Each rank writes its final parameters and its logged metrics to OUT_DIR/rank<R>.pt.
Usage: python ddp_two_tasks.py OUT_DIR [PRECISION]
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from datasets import Dataset
from transformers import BertConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TINY_BERT

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder


def main(out_dir: str, precision: str = "32-true") -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    tasks = [
        Task("sentiment", kind="binary", labels=["neg", "pos"]),
        Task("topic", kind="multiclass", labels=["sport", "money", "film"]),
    ]
    words = {"pos": "great wonderful superb", "neg": "awful boring dull"}
    sentiment = Dataset.from_dict(
        {
            "text": [
                f"a {words['pos' if i % 2 else 'neg'].split()[i % 3]} movie number {i}" for i in range(96)
            ],
            "sentiment": [i % 2 for i in range(96)],
        }
    )
    topic_words = ["football match goal", "bank shares profit", "actor cinema premiere"]
    topic = Dataset.from_dict(
        {"text": [f"news {topic_words[i % 3]} {i}" for i in range(40)], "topic": [i % 3 for i in range(40)]}
    )
    module = MultiTaskModule(
        HFEncoder.from_config(BertConfig(**TINY_BERT), tokenizer=PACKAGED_MINILM, freeze_layers=1),
        tasks,
        lr=1e-3,
    )
    data = MultiTaskDataModule(
        {"sentiment": sentiment, "topic": topic},
        tasks,
        tokenizer=PACKAGED_MINILM,
        batch_size=8,
        max_length=16,
    )
    trainer = L.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    flat = torch.cat([p.detach().flatten().float() for p in module.parameters()])
    torch.save(
        {"params": flat, "metrics": metrics, "world_size": trainer.world_size, "steps": trainer.global_step},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
