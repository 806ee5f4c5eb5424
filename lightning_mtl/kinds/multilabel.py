"""``multilabel``: C independent yes/no labels per example, a sigmoid per label."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAccuracy, MultilabelF1Score

from lightning_mtl.kinds.base import IGNORE_INDEX, Masked, Prepared, TaskKind, missing_mask, register_kind

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("multilabel")
class Multilabel(TaskKind):
    """C independent labels. Targets: ``[batch, C]`` of 0/1; a missing entry: NaN or -100. Loss: BCE.

    Example:
        >>> from lightning_mtl import Task
        >>> t = Task("tags", kind="multilabel", labels=["red", "round", "sweet"])
        >>> t.describe(torch.tensor([[3.0, -3.0, 2.0]]))[0]["labels"]
        ['red', 'sweet']
    """

    default_loss: ClassVar[str] = "bce"
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c, t = self.num_outputs(task), task.threshold
        return {
            "accuracy": lambda: MultilabelAccuracy(num_labels=c, threshold=t, ignore_index=IGNORE_INDEX),
            "macro_f1": lambda: MultilabelF1Score(
                num_labels=c, threshold=t, average="macro", ignore_index=IGNORE_INDEX
            ),
        }

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if target.shape != outputs.shape:
            raise self._error(
                task,
                f"expected shape [batch, num_labels] = {list(outputs.shape)}, got {tuple(target.shape)}.",
            )

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        valid = target[~missing_mask(target)]
        if valid.numel() and not bool(((valid == 0) | (valid == 1)).all()):
            raise self._error(task, "multilabel targets must be 0 or 1 (NaN or -100 when missing).")

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        labelled = ~missing_mask(target)
        safe = torch.where(labelled, target, torch.zeros((), dtype=target.dtype, device=target.device))
        return Prepared(outputs, safe.to(outputs.dtype), labelled)

    def missing_shape(self, task: Task, n: int) -> tuple[int, ...]:
        return (n, task.out_features)

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        missing = missing_mask(target)
        rows = ~missing.all(dim=1)
        metric_target = torch.where(missing, torch.full_like(target, IGNORE_INDEX), target).long()[rows]
        return Masked(
            outputs[~missing],
            target[~missing].float(),
            torch.sigmoid(outputs.detach().float())[rows],
            metric_target,
            int(rows.sum()),
        )

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.sigmoid(outputs.float())

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for row in probs.tolist():
            out.append(
                {
                    "labels": [self._label(task, i) for i, p in enumerate(row) if p >= task.threshold],
                    "probabilities": {self._label(task, i): p for i, p in enumerate(row)},
                }
            )
        return out
