"""``regression``: one or more real values per example."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, R2Score

from lightning_mtl.kinds.base import Masked, TaskKind, register_kind

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("regression")
class Regression(TaskKind):
    """Real-valued targets ``[batch]`` (or ``[batch, k]`` with ``num_outputs=k``); missing: NaN. Loss: MSE.

    ``labels`` may name the k outputs. Metrics (MAE, RMSE, R²) use the examples whose targets are all present.

    Example:
        >>> from lightning_mtl import Task
        >>> Task("stay", kind="regression").describe(torch.tensor([[4.5]]))
        [{'value': 4.5}]
    """

    default_loss: ClassVar[str] = "mse"
    needs_labels: ClassVar[bool] = False
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def num_outputs(self, task: Task) -> int:
        if task.num_outputs is not None:
            return int(task.num_outputs)
        return len(task.labels) if task.labels else 1

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        return {
            "mae": lambda: MeanAbsoluteError(),
            "rmse": lambda: MeanSquaredError(squared=False),
            "r2": lambda: R2Score(multioutput="uniform_average"),
        }

    def _shape(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        outputs = outputs.reshape(outputs.shape[0], -1)
        return outputs, target.reshape(target.shape[0], -1) if target.dim() else target

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        outputs, flat = self._shape(outputs, target)
        if target.dim() == 0 or flat.shape != outputs.shape:
            want = "[batch]" if outputs.shape[1] == 1 else f"[batch, {outputs.shape[1]}]"
            raise self._error(
                task, f"expected shape {want} with batch={outputs.shape[0]}, got {tuple(target.shape)}."
            )
        if not target.is_floating_point():
            raise self._error(
                task, f"regression targets must be floating point (NaN when missing), got {target.dtype}."
            )

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        outputs, target = self._shape(outputs, target)
        present = ~torch.isnan(target)
        rows = present.all(dim=1)
        preds, tgt = outputs.detach().float()[rows], target[rows].float()
        if preds.shape[1] == 1:
            preds, tgt = preds[:, 0], tgt[:, 0]
        return Masked(outputs[present], target[present].to(outputs.dtype), preds, tgt, int(rows.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        outputs = outputs.float().reshape(outputs.shape[0], -1)
        return outputs[:, 0] if outputs.shape[1] == 1 else outputs

    def describe(self, task: Task, probs: Tensor) -> list[dict[str, Any]]:
        if probs.dim() == 1:
            return [{"value": v} for v in probs.tolist()]
        names = task.labels or [str(i) for i in range(probs.shape[1])]
        return [{"values": dict(zip(names, row))} for row in probs.tolist()]
