"""``TabularDataModule``: one table with several label columns -> seeded splits, a pipeline fitted on
the training split, and batches of tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_mtl.tabular.pipeline import TabularPipeline
from lightning_mtl.tasks import Task

SPLITS = ("train", "val", "test")


def split_indices(
    n: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Seeded train/val/test row indices (sorted); with ``stratify``, each class is split in the same
    proportions.

    Example:
        >>> parts = split_indices(10, 0.2, 0.2, seed=0, stratify=[0] * 5 + [1] * 5)
        >>> [len(parts[s]) for s in ("train", "val", "test")]
        [6, 2, 2]
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
        )
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)]
    if stratify is not None:
        labels = pd.Series(np.asarray(stratify)).fillna("__missing__").to_numpy()
        if len(labels) != n:
            raise ValueError(f"stratify has {len(labels)} labels for {n} rows.")
        groups = [np.flatnonzero(labels == value) for value in pd.unique(labels)]
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for group in groups:
        order = rng.permutation(group)
        n_val, n_test = round(len(order) * val_fraction), round(len(order) * test_fraction)
        parts["val"].append(order[:n_val])
        parts["test"].append(order[n_val : n_val + n_test])
        parts["train"].append(order[n_val + n_test :])
    return {s: np.sort(np.concatenate(p)).astype("int64") for s, p in parts.items()}


class TensorBatches(Dataset[dict[str, Tensor]]):
    """Rows of a dict of equal-length tensors; a batch of indices is fetched with one indexing call
    (``__getitems__``), so no per-row collation is needed."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)
        sizes = {len(t) for t in self.tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"TensorBatches: the tensors have different lengths {sorted(sizes)}.")
        self.n = sizes.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


def _label_values(task: Task, column: pd.Series) -> np.ndarray:
    """A label column as float64 (NaN where missing); label names are mapped to their ids."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return column.astype("float64").to_numpy(dtype="float64", na_value=np.nan, copy=True)
    ids = {name: float(i) for i, name in enumerate(task.labels or [])}
    values = np.full(len(column), np.nan)
    for i, value in enumerate(column.tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if str(value) not in ids:
            raise ValueError(
                f"Task {task.name!r}, column {task.target_key!r}: row {i + 1} holds {value!r}, which is not "
                f"one of the task's labels {task.labels}."
            )
        values[i] = ids[str(value)]
    return values


def _identity(batch: Any) -> Any:
    return batch


class TabularDataModule(L.LightningDataModule):
    """A table whose rows carry the inputs and one label column per task.

    The rows are split once at construction (seeded, optionally stratified on a column), and a
    :class:`~lightning_mtl.tabular.TabularPipeline` is fitted on the training rows only, so a
    model can be built from :attr:`pipeline` before training (LightningCLI links it on instantiation).
    Batches are ``{"numeric", "categorical", <target_key>...}``; a missing label is NaN (binary and
    regression kinds) or -100 and masks the example out of that task.

    Args:
        frame: the table (inputs and label columns).
        tasks: the tasks; each reads the column named by its ``target_key``.
        numeric, categorical: the input columns (default: every column that is not a label, split by dtype).
        val_fraction, test_fraction, seed, stratify: the split (``stratify``: a column name).
        batch_size, eval_batch_size: rows per training / evaluation batch.
        log_skewed, clip: passed to :meth:`TabularPipeline.fit`.

    Example:
        >>> frame = pd.DataFrame({"x": np.arange(20.0), "c": ["a", "b"] * 10, "y": [0, 1] * 10})
        >>> dm = TabularDataModule(frame, [Task("y", kind="binary")], batch_size=8, stratify="y")
        >>> sorted(next(iter(dm.train_dataloader())))
        ['categorical', 'numeric', 'y']
        >>> dm.pipeline.columns, {s: len(v) for s, v in dm.frames.items()}
        (['x', 'c'], {'train': 14, 'val': 2, 'test': 4})
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        tasks: Sequence[Task | Mapping[str, Any]],
        *,
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        stratify: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        log_skewed: bool = True,
        clip: float | None = 5.0,
    ) -> None:
        super().__init__()
        self.tasks = [Task.coerce(t) for t in tasks]
        targets = [t.target_key for t in self.tasks]
        absent = [k for k in targets if k not in frame.columns]
        if absent:
            raise KeyError(
                f"the frame has no label column(s) {absent} for the tasks; it has {list(frame.columns)}."
            )
        if numeric is None and categorical is None:
            inputs = frame.drop(columns=targets)
            numeric = [str(c) for c in inputs.columns if pd.api.types.is_numeric_dtype(inputs[c])]
            categorical = [str(c) for c in inputs.columns if str(c) not in numeric]
        leaked = sorted(set(targets) & set(list(numeric or []) + list(categorical or [])))
        if leaked:
            raise ValueError(
                f"label column(s) {leaked} are also listed as inputs; remove them from the inputs."
            )
        if stratify is not None and stratify not in frame.columns:
            raise KeyError(f"stratify={stratify!r} is not a column of the frame.")
        self.seed = seed
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        index = split_indices(
            len(frame),
            val_fraction,
            test_fraction,
            seed,
            frame[stratify].to_numpy() if stratify is not None else None,
        )
        self.frames = {s: frame.iloc[index[s]].reset_index(drop=True) for s in SPLITS}
        self.pipeline = TabularPipeline.fit(
            self.frames["train"], numeric, categorical, log_skewed=log_skewed, clip=clip
        )
        self.datasets = {s: TensorBatches(self.encode(f)) for s, f in self.frames.items() if len(f)}

    def encode(self, frame: pd.DataFrame) -> dict[str, Tensor]:
        """Inputs (through the fitted pipeline) and labels of ``frame`` as tensors."""
        out = self.pipeline.transform(frame)
        for task in self.tasks:
            values = _label_values(task, frame[task.target_key])
            dtype = task.kind_obj.target_dtype
            if dtype.is_floating_point:
                out[task.target_key] = torch.from_numpy(values).to(dtype)
            else:
                out[task.target_key] = torch.from_numpy(np.where(np.isnan(values), -100, values)).long()
        return out

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            return []  # type: ignore[return-value]
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            collate_fn=_identity,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
