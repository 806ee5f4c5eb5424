"""Batch collation for multi-task data: dynamic padding and missing-label filling."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.batch_checks import (
    NONFINITE_MODES,
    infinite_rows,
    infinite_target_error,
    nonfinite_input_error,
    nonfinite_rows,
)
from lightning_mtl.kinds.base import as_tensor
from lightning_mtl.tasks import Task

PAD_ZERO_KEYS = ("attention_mask", "token_type_ids", "special_tokens_mask")


class MultiTaskCollator:
    """Turn a list of example dicts into a batch dict.

    * ``input_ids`` are padded with ``pad_token_id``, masks with 0, token-task labels with -100.
    * A task's target that is absent from an example, ``None`` or NaN becomes "missing": NaN for float
      kinds (binary, multilabel, regression), -100 for integer kinds — the module masks it out. With
      ``fill_absent`` (default) an example-level task's key is in every batch, even when no example of the
      batch has it (a sparse batch without any label is then skipped, not an error); ``False`` for per-task
      datasets, whose batches carry their own task's key only.
    * Other keys are stacked (tensors, numbers, equal-length lists).
    * ``nonfinite``: a NaN or infinity in a float input, or an infinity in a float label, raises a
      ``ValueError`` naming the key and row (``"raise"``, the default); ``"skip"`` drops such input rows and
      marks such labels missing, counted in ``dropped_rows`` / ``masked_labels`` and warned once (with
      ``num_workers > 0`` each worker process keeps its own counts).

    Example:
        >>> c = MultiTaskCollator([Task("y", kind="binary"), Task("z", kind="multiclass", num_outputs=3)])
        >>> b = c([{"x": [1.0, 2.0], "y": 1, "z": 2}, {"x": [0.0, 1.0], "z": None}])
        >>> b["y"], b["z"]
        (tensor([1., nan]), tensor([   2, -100]))
    """

    def __init__(
        self, tasks: Sequence[Task], pad_token_id: int = 0, nonfinite: str = "raise", fill_absent: bool = True
    ) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}.")
        self.by_key = {t.target_key: t for t in tasks}
        self.pad_token_id = int(pad_token_id)
        self.nonfinite = nonfinite
        self.fill_absent = fill_absent
        self.dropped_rows = 0
        self.masked_labels = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        keys: list[str] = []
        for ex in examples:
            if not isinstance(ex, Mapping):
                raise TypeError(f"Each example must be a dict of inputs and labels, got {type(ex).__name__}.")
            keys += [k for k in ex if k not in keys]
        batch: dict[str, Tensor] = {}
        ids = [ex.get("input_ids") for ex in examples]
        width = max((len(v) for v in ids if v is not None), default=0)
        for key in keys:
            values = [ex.get(key) for ex in examples]
            if key in self.by_key:
                batch[key] = self._targets(self.by_key[key], values, width)
            elif key == "input_ids":
                batch[key] = _pad([as_tensor(v, key) for v in values], self.pad_token_id)
            elif key in PAD_ZERO_KEYS:
                batch[key] = _pad([as_tensor(v, key) for v in values], 0)
            elif all(v is not None for v in values):
                try:
                    batch[key] = torch.stack([as_tensor(v, key) for v in values])
                except (RuntimeError, TypeError):
                    continue  # strings, ragged metadata: not model inputs
        for key, task in self.by_key.items() if self.fill_absent else ():  # a label no example has: missing
            if key not in batch and task.kind_obj.label_level == "example":
                batch[key] = self._targets(task, [None] * len(examples), width)
        return self._finite(batch)

    def _finite(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raise on (or drop) rows with a NaN/inf input and labels with an infinity (on the CPU, per batch)."""
        drop: set[int] = set()
        masked = 0
        for key, t in batch.items():
            if not t.is_floating_point() or t.dim() == 0:
                continue
            task = self.by_key.get(key)
            rows = infinite_rows(t) if task is not None else nonfinite_rows(t)
            if not rows.numel():
                continue
            if self.nonfinite == "raise":
                row = int(rows[0])
                if task is not None:
                    raise infinite_target_error(task.name, key, t, row, "batch")
                raise nonfinite_input_error(key, t, row, "batch")
            if task is not None:
                masked += int(torch.isinf(t).sum())
                batch[key] = torch.where(torch.isinf(t), torch.full_like(t, float("nan")), t)
            else:
                drop.update(int(r) for r in rows)
        if drop:
            n = next(iter(batch.values())).shape[0]
            if len(drop) == n:
                raise ValueError(
                    f"Every row of the batch ({n}) has a non-finite input (nonfinite='skip' would leave none). "
                    "Clean the data."
                )
            keep = torch.tensor([i for i in range(n) if i not in drop])
            batch = {k: v.index_select(0, keep) if v.dim() else v for k, v in batch.items()}
            self.dropped_rows += len(drop)
        self.masked_labels += masked
        if (drop or masked) and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                f"MultiTaskCollator(nonfinite='skip'): dropped {len(drop)} row(s) with a NaN/inf input and marked "
                f"{masked} infinite label(s) missing in this batch. Later ones are counted in "
                "collator.dropped_rows / collator.masked_labels without a warning.",
                stacklevel=2,
            )
        return batch

    def _targets(self, task: Task, values: list[Any], width: int) -> Tensor:
        """Stack one task's labels; ``width`` is the padded ``input_ids`` length (token labels match it)."""
        return task.kind_obj.collate(task, values, width)


def _pad(seqs: list[Tensor], value: int, min_length: int = 0) -> Tensor:
    length = max(min_length, *(int(s.shape[0]) for s in seqs))
    out = torch.full((len(seqs), length, *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out
