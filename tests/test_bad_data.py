"""Bad data gets a clear error before the first optimizer step; batches without any label are skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.data import MultiTaskCollator

NAN, INF = float("nan"), float("inf")
TASKS = [
    Task("risk", kind="binary"),
    Task("stay", kind="regression"),
    Task("group", kind="multiclass", num_outputs=3),
]


def good() -> dict[str, torch.Tensor]:
    return {
        "x": torch.arange(16.0).reshape(4, 4) / 16,
        "risk": torch.tensor([0.0, 1.0, 0.0, 1.0]),
        "stay": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "group": torch.tensor([0, 1, 2, 0]),
    }


def changed(**kv: object) -> dict[str, torch.Tensor]:
    batch = good()
    for key, value in kv.items():
        if value is None:
            batch.pop(key)
        elif callable(value):
            batch[key] = value(batch[key])
        else:
            batch[key] = value  # type: ignore[assignment]
    return batch


def put(row: int, value: float, col: int | None = None):  # type: ignore[no-untyped-def]
    def f(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if col is None:
            t[row] = value
        else:
            t[row, col] = value
        return t

    return f


class Keyed(nn.Module):
    """An MLP that declares which batch keys it reads."""

    input_keys = ["x"]

    def __init__(self) -> None:
        super().__init__()
        self.net = MLPBackbone(4, [8])
        self.out_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def module(backbone: nn.Module | None = None) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(backbone or MLPBackbone(4, [8]), TASKS)


BAD_BATCHES = {
    "nan input": (
        changed(x=put(2, NAN, 1)),
        ValueError,
        ["'x'", "row 2", "nan", "Clean", "nonfinite='skip'"],
    ),
    "inf input": (changed(x=put(1, -INF, 0)), ValueError, ["'x'", "row 1", "-inf", "Clean"]),
    "inf regression target": (
        changed(stay=put(3, INF)),
        ValueError,
        ["'stay'", "row 3", "inf", "missing label is NaN", "nonfinite='skip'"],
    ),
    "class id -1": (changed(group=put(0, -1)), ValueError, ["'group'", "-1", "out of range", "-100"]),
    "misspelled label key": (
        changed(stay=None, stya=torch.ones(4)),
        KeyError,
        ["'stay'", "'stya'", "did you mean", "target_key="],
    ),
    "empty batch": (
        {k: v[:0] for k, v in good().items()},
        ValueError,
        ["Empty training batch 0", "0 rows", "must not yield empty batches"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_gets_a_clear_error_before_any_step(case):
    batch, error, words = BAD_BATCHES[case]
    m = module(Keyed())
    with pytest.raises(error) as info:
        m.training_step(batch, 0)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_misspelled_key_in_a_per_task_batch_names_the_nearest_key():
    m = module()
    batch = {"stay": {"x": torch.ones(2, 4), "sty": torch.ones(2)}}
    with pytest.raises(KeyError, match="Did you mean 'sty'"):
        m.training_step(batch, 0)


def test_a_key_neither_input_nor_target_is_named_when_input_keys_are_set():
    m = module(Keyed())
    with pytest.warns(UserWarning, match=r"\['weight'\].*neither backbone inputs"):
        m.training_step(changed(weight=torch.ones(4)), 0)


def test_checks_that_read_values_stop_after_the_checked_batches():
    m = MultiTaskModule(MLPBackbone(4, [8]), TASKS, check_inputs=1)
    m.training_step(good(), 0)
    loss = m.training_step(changed(x=put(0, NAN, 0)), 1)  # trusted: no device read in the steady state
    assert torch.isnan(loss)


# --- batches without any label ---------------------------------------------------------------------
def rows(labelled: list[bool]) -> list[dict[str, object]]:
    return [
        {"x": [0.1 * i, 1.0, -1.0, 0.5], "risk": float(i % 2), "stay": float(i), "group": i % 3}
        if on
        else {"x": [0.1 * i, 1.0, -1.0, 0.5]}
        for i, on in enumerate(labelled)
    ]


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.params.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


def test_an_all_unlabelled_training_batch_is_skipped_counted_and_warned_once():
    m = module()
    snaps = Snapshots()
    # batches of 4: labelled, unlabelled, unlabelled, labelled (no shuffling)
    data = rows([True] * 4 + [False] * 8 + [True] * 4)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snaps],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(m, DataLoader(data, batch_size=4, collate_fn=MultiTaskCollator(TASKS)))
    # AdamW's momentum would move every parameter on a zero-loss step: the skipped batches leave them bitwise equal
    assert torch.equal(snaps.params[0], snaps.params[1]) and torch.equal(snaps.params[1], snaps.params[2])
    assert not torch.equal(snaps.params[2], snaps.params[3])
    assert m.skipped_batches == 2
    skipped = [w for w in caught if "has no label for any task" in str(w.message)]
    assert len(skipped) == 1 and "Training batch 1" in str(skipped[0].message)


def test_an_unlabelled_validation_batch_is_named_once_per_stage():
    m = module()
    batch = MultiTaskCollator(TASKS)(rows([False] * 4))
    with pytest.warns(UserWarning, match="Validation batch 3 has no label for any task") as caught:
        m.on_before_batch_transfer(batch, 0)
        m.validation_step(batch, 3)
        m.on_before_batch_transfer(batch, 0)
        m.validation_step(batch, 4)
    assert sum("has no label" in str(w.message) for w in caught) == 1
    with pytest.warns(UserWarning, match="Test batch 0"):
        m.test_step({"x": torch.ones(2, 4)}, 0)


@pytest.mark.multiprocess
def test_ddp_ranks_skip_together_only_when_no_rank_has_a_label(tmp_path):
    helper = Path(__file__).parent / "helpers" / "ddp_unlabelled.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(helper), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a rank that skips alone would hang DDP: the test fails instead
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    for r in ranks:
        params = r["params"]
        assert torch.equal(params[0], params[1])  # step 1: nobody had a label, nobody moved
        assert not torch.equal(params[1], params[2])  # step 2: rank 0 had labels, both stepped
    for step in range(4):
        assert torch.equal(ranks[0]["params"][step], ranks[1]["params"][step]), step


@pytest.mark.parametrize("gappy", [False, True])
def test_the_skip_agreement_is_left_out_when_the_data_cannot_be_unlabelled(gappy, monkeypatch):
    """The per-step all-reduce of the skip flag (DDP) runs only for data that can yield an unlabelled batch."""
    from datasets import Dataset

    import lightning_mtl.module as module_py
    from lightning_mtl import MultiTaskDataModule

    calls: list[bool] = []
    real = module_py._all_ranks_any
    monkeypatch.setattr(
        module_py, "_all_ranks_any", lambda local, trainer: calls.append(local) or real(local, trainer)
    )
    rows = {"x": [[float(i)] * 4 for i in range(16)], "risk": [1.0, 0.0] * 8, "stay": [0.5] * 16}
    if gappy:
        rows["risk"][3], rows["stay"][3] = None, None
    ds = Dataset.from_dict(rows)
    tasks = [Task("risk", kind="binary"), Task("stay", kind="regression")]
    dm = MultiTaskDataModule({"train": ds, "val": ds, "test": ds}, tasks=tasks, batch_size=4)
    m = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), tasks)
    L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(m, datamodule=dm)
    assert len(calls) == (4 if gappy else 0)


def test_lightnings_note_on_our_batch_hook_is_silenced_and_nothing_else():
    m = module()
    note = (
        "You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a "
        "`LightningDataModule`. It will use the implementation from `LightningModule` instance."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.on_fit_start()
        warnings.warn(note, UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
