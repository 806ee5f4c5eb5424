"""Run by tests/data/test_resume.py: mid-epoch resume under 2-process DDP on CPU (gloo).

For each data layout (one multi-label dataset; per-task datasets with a short task cycling across the
checkpoint; tokenised text with the length-grouped sampler) and the FAMO balancer (stateful, with a
post-step update): an uninterrupted 2-process run to STEPS steps that saves a checkpoint at CKPT_STEP, then
a fresh 2-process run resumed from it. Each rank writes ``OUT_DIR/<layout>-<full|resumed>-rank<R>.pt``.
Lightning injects a DistributedSampler wrapper (``use_distributed_sampler=True``, the default).
Usage: python ddp_resume.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "data"))
from test_resume import (  # noqa: E402
    CKPT_STEP,
    STEPS,
    multilabel_data,
    per_task_data,
    state,
    tabular_module,
    text_data,
    text_module,
    trainer,
)

# training metrics on the default schedule (every 10th batch): the resumed epoch's remaining batches update
# none of them, and the epoch's metrics still compute (NaN) on every rank
EVERY: dict[str, int] = {}
LAYOUTS = {
    "multilabel": (lambda: tabular_module("famo", **EVERY), lambda: multilabel_data(80)),
    "per_task": (lambda: tabular_module("famo", **EVERY), lambda: per_task_data(scale=2)),
    "text": (lambda: text_module("famo", **EVERY), lambda: text_data(80)),
}
DDP = {"strategy": "ddp", "devices": 2}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    for layout, (make_module, make_data) in LAYOUTS.items():
        ckpt_dir = out / layout
        ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=CKPT_STEP, save_top_k=-1, filename="{step}"
        )
        module = make_module()
        full = trainer(STEPS, callbacks=[ckpt], **DDP)
        full.fit(module, make_data())
        rank = full.global_rank
        torch.save({"state": state(module), "steps": full.global_step}, out / f"{layout}-full-rank{rank}.pt")

        module = make_module()
        resumed = trainer(STEPS, enable_checkpointing=False, **DDP)
        resumed.fit(module, make_data(), ckpt_path=ckpt_dir / f"step={CKPT_STEP}.ckpt")
        torch.save(
            {"state": state(module), "steps": resumed.global_step}, out / f"{layout}-resumed-rank{rank}.pt"
        )


if __name__ == "__main__":
    main(sys.argv[1])
