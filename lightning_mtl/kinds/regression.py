"""``regression``: one or more real values per example."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, R2Score

from lightning_mtl.kinds.base import Masked, Prepared, TaskKind, register_kind

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("regression")
class Regression(TaskKind):
    """Real-valued targets ``[batch]`` (or ``[batch, k]`` with ``num_outputs=k``); missing: NaN. Loss: MSE.

    ``labels`` may name the k outputs. Metrics (MAE, RMSE, R²) use the examples whose targets are all present.
    With ``Task(target_transform="log1p")`` the head learns ``log1p(target)`` (the loss compares on that
    scale) while metrics and predictions are mapped back with ``expm1`` to the target's units.

    Example:
        >>> from lightning_mtl import Task
        >>> Task("stay", kind="regression").describe(torch.tensor([[4.5]]))
        [{'value': 4.5}]
        >>> round(Task("stay", kind="regression", target_transform="log1p").describe(torch.tensor([[1.0]]))[0]["value"], 4)
        1.7183
    """

    default_loss: ClassVar[str] = "mse"
    needs_labels: ClassVar[bool] = False
    target_dtype: ClassVar[torch.dtype] = torch.float32
    target_transforms: ClassVar[dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]] = {
        "log1p": (torch.log1p, torch.expm1),
    }
    """``Task.target_transform`` name -> (forward applied to targets, inverse applied to outputs)."""

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

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
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

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        if task.target_transform == "log1p" and bool((target <= -1).any()):
            raise self._error(
                task,
                f"target_transform 'log1p' needs targets above -1, got minimum {float(target.nan_to_num(0).min())}.",
            )

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        outputs, target = self._shape(outputs, target)
        labelled = ~torch.isnan(target)
        safe = torch.where(
            labelled, target, torch.zeros((), dtype=target.dtype, device=target.device)
        ).float()
        if task.target_transform is not None:
            safe = self.target_transforms[task.target_transform][0](safe)
        return Prepared(outputs, safe.to(outputs.dtype), labelled)

    def missing_shape(self, task: Task, n: int) -> tuple[int, ...]:
        return (n, task.out_features) if task.out_features > 1 else (n,)

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        outputs, target = self._shape(outputs, target)
        present = ~torch.isnan(target)
        rows = present.all(dim=1)
        preds, tgt = self._inverse(task, outputs.detach().float()[rows]), target[rows].float()
        if preds.shape[1] == 1:
            preds, tgt = preds[:, 0], tgt[:, 0]
        loss_target = target[present]
        if task.target_transform is not None:
            loss_target = self.target_transforms[task.target_transform][0](loss_target.float())
        return Masked(outputs[present], loss_target.to(outputs.dtype), preds, tgt, int(rows.sum()))

    def _inverse(self, task: Task, outputs: Tensor) -> Tensor:
        """Head outputs in the target's units (undoing ``task.target_transform``)."""
        if task.target_transform is None:
            return outputs
        return self.target_transforms[task.target_transform][1](outputs)

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        outputs = self._inverse(task, outputs.float().reshape(outputs.shape[0], -1))
        return outputs[:, 0] if outputs.shape[1] == 1 else outputs

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        if probs.dim() == 1:
            return [{"value": v} for v in probs.tolist()]
        names = task.labels or [str(i) for i in range(probs.shape[1])]
        return [{"values": dict(zip(names, row))} for row in probs.tolist()]
