"""Exact resume from a mid-epoch checkpoint: a run resumed from the checkpoint at step K ends with bitwise the
parameters and balancer state of the uninterrupted run, for every stateful balancer (and ``static``), on one
multi-label dataset, on per-task datasets (a short task cycling across the checkpoint), with the
length-grouped sampler, with dropout (the global RNG), and under 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TABULAR_TASKS, DictDataset, ToyTokenBackbone, toy_tabular
from datasets import Dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.backbones.hf_encoder import PACKAGED_MINILM
from lightning_mtl.balancing import create_balancer

BALANCERS = ["static", "uncertainty", "famo", "nash_mtl", "gradvac", "dwa", "rlw", "graddrop", "gradnorm"]
STEPS, CKPT_STEP = 8, 3  # 5 batches an epoch: the checkpoint is mid-epoch 0, the run ends in epoch 1
HELPER = Path(__file__).parent.parent / "helpers" / "ddp_resume.py"


def tabular_module(balancer: str, **kwargs) -> MultiTaskModule:
    torch.manual_seed(0)
    backbone = MLPBackbone(8, hidden=(16,), dropout=0.2)  # dropout: the resumed run must restore the RNG
    return MultiTaskModule(backbone, TABULAR_TASKS, balancer=create_balancer(balancer), lr=1e-2, **kwargs)


def multilabel_data(n: int = 40) -> MultiTaskDataModule:
    ds = DictDataset(toy_tabular(n))
    return MultiTaskDataModule(ds, TABULAR_TASKS, batch_size=8, val_fraction=0.0, test_fraction=0.0)


def per_task_data(mode: str = "max_size_cycle", scale: int = 1) -> MultiTaskDataModule:
    """``risk``/``group``: 5 batches an epoch; ``flags``: 2 and ``stay``: 1, which cycle before step 3
    (``scale``: the number of processes, each of which reads ``1/scale`` of every dataset)."""
    data = toy_tabular(40 * scale)
    sizes = {"risk": 40 * scale, "group": 40 * scale, "flags": 16 * scale, "stay": 8 * scale}
    per_task = {name: DictDataset({"x": data["x"][:n], name: data[name][:n]}) for name, n in sizes.items()}
    return MultiTaskDataModule(
        per_task, TABULAR_TASKS, batch_size=8, val_fraction=0.0, test_fraction=0.0, train_mode=mode
    )


WORDS = [
    "the",
    "model",
    "reads",
    "many",
    "words",
    "of",
    "different",
    "length",
    "across",
    "every",
    "example",
    "in",
    "this",
    "corpus",
]
TEXT_TASKS = [Task("topic", kind="multiclass", labels=["a", "b", "c"]), Task("risk", kind="binary")]


def text_module(balancer: str, **kwargs) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        ToyTokenBackbone(vocab=30522, hidden=8),
        TEXT_TASKS,
        balancer=create_balancer(balancer),
        lr=1e-2,
        input_keys=["input_ids"],
        **kwargs,
    )


def text_data(n: int = 40) -> MultiTaskDataModule:
    texts = [" ".join(WORDS[: 1 + (i * 7) % 14]) for i in range(n)]
    ds = Dataset.from_dict(
        {"text": texts, "topic": ["abc"[i % 3] for i in range(n)], "risk": [i % 2 for i in range(n)]}
    )
    return MultiTaskDataModule(
        ds,
        TEXT_TASKS,
        tokenizer=PACKAGED_MINILM,
        max_length=16,
        batch_size=8,
        val_fraction=0.0,
        test_fraction=0.0,
        group_by_length=True,
    )


def trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def state(module: MultiTaskModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_resume_exact(make_module, make_data, tmp_path: Path, ckpt_step: int = CKPT_STEP) -> None:
    """Uninterrupted run (saving a checkpoint at ``ckpt_step``) vs a fresh run resumed from that checkpoint."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=ckpt_step, save_top_k=-1, filename="{step}")
    module = make_module()
    trainer(STEPS, callbacks=[ckpt]).fit(module, make_data())
    reference = state(module)
    path = tmp_path / f"step={ckpt_step}.ckpt"
    assert path.exists(), sorted(os.listdir(tmp_path))

    resumed_module = make_module()
    resumed = trainer(STEPS, enable_checkpointing=False)
    resumed.fit(resumed_module, make_data(), ckpt_path=path)
    assert resumed.global_step == STEPS
    after = state(resumed_module)
    assert after.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(reference[k], after[k])]
    assert not differ, f"resumed run differs from the uninterrupted one in {differ}"


@pytest.mark.parametrize("balancer", BALANCERS)
def test_mid_epoch_resume_multilabel(balancer, tmp_path):
    assert_resume_exact(lambda: tabular_module(balancer), multilabel_data, tmp_path)


@pytest.mark.parametrize("balancer", BALANCERS)
def test_mid_epoch_resume_per_task_cycling(balancer, tmp_path):
    assert_resume_exact(lambda: tabular_module(balancer), per_task_data, tmp_path)


@pytest.mark.parametrize("mode", ["min_size", "max_size"])
def test_mid_epoch_resume_per_task_modes(mode, tmp_path):
    assert_resume_exact(lambda: tabular_module("famo"), lambda: per_task_data(mode), tmp_path, ckpt_step=1)


@pytest.mark.parametrize("balancer", BALANCERS)
def test_mid_epoch_resume_length_grouped(balancer, tmp_path):
    assert_resume_exact(lambda: text_module(balancer), text_data, tmp_path)


def test_end_of_epoch_resume_still_exact(tmp_path):
    assert_resume_exact(lambda: tabular_module("uncertainty"), per_task_data, tmp_path, ckpt_step=5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mid_epoch_resume_ddp(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    for data in ("multilabel", "per_task", "text"):
        full = torch.load(tmp_path / f"{data}-full-rank0.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"{data}-resumed-rank0.pt", weights_only=True)
        other = torch.load(tmp_path / f"{data}-resumed-rank1.pt", weights_only=True)
        assert full["steps"] == resumed["steps"] == STEPS
        differ = [k for k in full["state"] if not torch.equal(full["state"][k], resumed["state"][k])]
        assert not differ, f"{data}: DDP resumed run differs in {differ}"
        assert all(torch.equal(resumed["state"][k], other["state"][k]) for k in full["state"])
