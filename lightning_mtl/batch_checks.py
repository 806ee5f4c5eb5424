"""Checks of a batch's data with clear errors: non-finite values, misspelled label keys, empty batches,
and whether a batch carries any label at all (read on the host, before the batch reaches the device)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.kinds.base import IGNORE_INDEX, missing_mask

NONFINITE_MODES = ("raise", "skip")


def nonfinite_rows(t: Tensor) -> Tensor:
    """Row indices (dimension 0) of ``t`` that hold a NaN or an infinity.

    Example:
        >>> nonfinite_rows(torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [2.0, float("nan")]]))
        tensor([1, 2])
    """
    bad = ~torch.isfinite(t)
    if t.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    return torch.nonzero(bad.reshape(-1) if t.dim() <= 1 else bad).flatten()


def infinite_rows(t: Tensor) -> Tensor:
    """Row indices of ``t`` that hold an infinity (a float target's NaN means "missing", not "bad").

    Example:
        >>> infinite_rows(torch.tensor([1.0, float("nan"), float("-inf")]))
        tensor([2])
    """
    bad = torch.isinf(t)
    if t.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    return torch.nonzero(bad.reshape(-1)).flatten()


def nonfinite_input_error(key: str, t: Tensor, row: int, where: str) -> ValueError:
    """The error for a NaN or infinity in an input row."""
    value = t[row][~torch.isfinite(t[row])].flatten()[0].item() if t.dim() else t.item()
    return ValueError(
        f"Input key {key!r}, row {row} of the {where}: non-finite value {value} (every parameter would turn NaN "
        "after one step). Clean the data (drop or impute that row), or pass nonfinite='skip' to "
        "MultiTaskCollator / MultiTaskDataModule to drop such rows."
    )


def infinite_target_error(task: str, key: str, t: Tensor, row: int, where: str) -> ValueError:
    """The error for an infinite label (a missing label is NaN or None)."""
    value = t[row][torch.isinf(t[row])].flatten()[0].item() if t.dim() else t.item()
    return ValueError(
        f"Task {task!r}, target key {key!r}, row {row} of the {where}: non-finite label {value} (a missing "
        "label is NaN or None). Clean the data, or pass nonfinite='skip' to MultiTaskCollator / "
        "MultiTaskDataModule to mark such labels missing."
    )


def check_finite(
    inputs: Any, targets: Mapping[str, Tensor], target_keys: Mapping[str, str], where: str
) -> None:
    """Raise on a NaN/inf in a float input tensor or an infinity in a float target (reads the values:
    for the first batches of a stage only). ``target_keys``: ``{task: its batch key}``."""
    items = inputs.items() if isinstance(inputs, Mapping) else [("inputs", inputs)]
    for key, t in items:
        if isinstance(t, Tensor) and t.is_floating_point():
            rows = nonfinite_rows(t)
            if rows.numel():
                raise nonfinite_input_error(str(key), t, int(rows[0]), where)
    for task, t in targets.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            rows = infinite_rows(t)
            if rows.numel():
                raise infinite_target_error(task, target_keys.get(task, task), t, int(rows[0]), where)


def nearest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``key`` (a likely misspelling), or ``None``.

    Example:
        >>> nearest_key("sentiment", ["input_ids", "sentimnt"])
        'sentimnt'
    """
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.75)
    return match[0] if match else None


def check_label_keys(
    batch_keys: Iterable[str], target_keys: Mapping[str, str], input_keys: Iterable[str] | None
) -> list[str]:
    """Raise if a task's target key is absent while a close spelling of it is in the batch; return the batch
    keys that are neither inputs (when ``input_keys`` is known) nor targets (ignored keys, to warn about).
    ``target_keys``: ``{task: its batch key}``."""
    keys = [str(k) for k in batch_keys]
    inputs = set(input_keys) if input_keys is not None else None
    targets = set(target_keys.values())
    spare = [k for k in keys if k not in targets and (inputs is None or k not in inputs)]
    for task, key in target_keys.items():
        if key in keys:
            continue
        near = nearest_key(key, spare)
        if near is not None:
            raise KeyError(
                f"Task {task!r} reads target key {key!r}, which is not in the batch (keys: {sorted(keys)}); "
                f"did you mean {near!r}? Rename the column, or set Task({task!r}, target_key={near!r})."
            )
    return spare if inputs is not None else []


def num_rows(inputs: Any) -> int | None:
    """The batch size of a group's inputs from its first tensor's shape (no device read), or ``None``."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            if isinstance(value, Tensor) and value.dim():
                return int(value.shape[0])
    return None


def host_labelled(targets: Iterable[Tensor]) -> bool | None:
    """Whether any of ``targets`` holds a label, read on the host; ``None`` when a target is not on the CPU
    (reading it would wait for the device)."""
    found = False
    for t in targets:
        if not isinstance(t, Tensor) or t.device.type != "cpu" or not t.numel():
            return None  # on a device, or empty (the step names an empty batch)
        if not found:
            found = _any_present(t)
    return found


def _any_present(t: Tensor) -> bool:
    # numpy reads the CPU buffer without dispatching torch ops: the step-overhead counts stay unchanged
    if t.dtype in (torch.float16, torch.bfloat16) or t.requires_grad:
        return bool((~missing_mask(t.detach())).any())
    a = t.numpy()
    missing = a == IGNORE_INDEX
    if a.dtype.kind == "f":
        missing |= np.isnan(a)
    return not bool(missing.all())
