"""Seeded, stratified splits and the tabular data module: the pipeline sees the training rows only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_mtl import Task
from lightning_mtl.tabular import TabularDataModule, TensorBatches, split_indices

TASKS = [
    Task("death", kind="binary", labels=["survived", "died"], target_key="dead"),
    Task("stay", kind="regression"),
    Task("group", kind="multiclass", labels=["a", "b", "c"]),
]


def table(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.normal(60, 10, n),
            "lab": np.where(rng.random(n) < 0.3, np.nan, rng.normal(1, 0.2, n)),
            "sex": rng.choice(["f", "m"], n),
            "dead": (rng.random(n) < 0.25).astype(int),
            "stay": rng.integers(3, 40, n).astype(float),
            "group": rng.choice(["a", "b", "c"], n),
        }
    )
    frame.loc[5, "stay"] = np.nan  # a missing label
    return frame


def test_split_indices_are_disjoint_complete_and_seeded():
    parts = split_indices(100, 0.1, 0.2, seed=3)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    again = split_indices(100, 0.1, 0.2, seed=3)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)
    assert not np.array_equal(parts["test"], split_indices(100, 0.1, 0.2, seed=4)["test"])


def test_stratified_split_keeps_the_class_balance():
    labels = np.array([1] * 25 + [0] * 75)
    parts = split_indices(100, 0.1, 0.2, seed=0, stratify=labels)
    assert [int(labels[parts[s]].sum()) for s in ("train", "val", "test")] == [18, 2, 5]  # 2.5 rounds to 2


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="sum below 1"):
        split_indices(10, 0.5, 0.5, seed=0)


def test_pipeline_is_fitted_on_the_training_rows_only():
    frame = table()
    dm = TabularDataModule(frame, TASKS, seed=1, stratify="dead")
    train = dm.frames["train"]
    assert len(train) == 140 and len(dm.frames["val"]) == 20 and len(dm.frames["test"]) == 40
    assert dm.pipeline.columns == ["age", "lab", "sex"]  # the label columns are not inputs
    age = dm.pipeline.numeric[0]
    assert age.median == pytest.approx(float(train["age"].median()))
    assert age.median != pytest.approx(float(frame["age"].median()))
    assert dm.pipeline.numeric[1].indicator  # lab has missing values


def test_batches_hold_inputs_and_labels():
    dm = TabularDataModule(table(), TASKS, batch_size=32, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"numeric", "categorical", "dead", "stay", "group"}
    assert batch["numeric"].shape == (32, dm.pipeline.numeric_width)
    assert batch["dead"].dtype == torch.float32 and batch["group"].dtype == torch.long
    assert set(batch["group"].tolist()) <= {0, 1, 2}  # label names mapped to ids
    evaluation = list(dm.val_dataloader())
    assert len(evaluation) == 1 and len(evaluation[0]["stay"]) == 20


def test_a_missing_label_stays_missing():
    frame = table()
    dm = TabularDataModule(frame, TASKS, val_fraction=0.0, test_fraction=0.0)
    assert int(torch.isnan(dm.datasets["train"].tensors["stay"]).sum()) == 1


def test_label_columns_cannot_be_inputs_and_must_exist():
    with pytest.raises(ValueError, match=r"label column\(s\) \['dead'\] are also listed as inputs"):
        TabularDataModule(table(), TASKS, numeric=["age", "dead"], categorical=["sex"])
    with pytest.raises(KeyError, match=r"no label column\(s\) \['stay'\]"):
        TabularDataModule(table().drop(columns=["stay"]), TASKS)
    frame = table()
    frame.loc[0, "group"] = "z"
    with pytest.raises(ValueError, match=r"Task 'group', column 'group': row \d+ holds 'z'"):
        TabularDataModule(frame, TASKS, val_fraction=0.0, test_fraction=0.0)


def test_tensor_batches_fetch_a_batch_in_one_indexing_call():
    data = TensorBatches({"x": torch.arange(10.0), "y": torch.arange(10)})
    assert torch.equal(data.__getitems__([3, 1])["x"], torch.tensor([3.0, 1.0]))
    assert data[4]["y"].item() == 4 and len(data) == 10
    with pytest.raises(ValueError, match="different lengths"):
        TensorBatches({"x": torch.zeros(3), "y": torch.zeros(4)})
