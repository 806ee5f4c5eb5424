"""``multiclass``: one of C classes per example, softmax over C logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mtl.kinds.base import (
    IGNORE_INDEX,
    Masked,
    Prepared,
    TaskKind,
    TaskLoss,
    missing_mask,
    register_kind,
)

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("multiclass")
class Multiclass(TaskKind):
    """C exclusive classes. Targets: class ids ``[batch]`` (long); missing: -100. Loss: cross-entropy.

    Example:
        >>> from lightning_mtl import Task
        >>> t = Task("topic", kind="multiclass", labels=["news", "sport", "tech"])
        >>> t.describe(torch.tensor([[0.1, 3.0, 0.2]]))[0]["label"]
        'sport'
    """

    min_outputs: ClassVar[int] = 2

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c = self.num_outputs(task)
        return {
            "accuracy": lambda: MulticlassAccuracy(num_classes=c, average="micro"),
            "macro_f1": lambda: MulticlassF1Score(num_classes=c, average="macro"),
        }

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if target.shape != (outputs.shape[0],):
            raise self._error(
                task,
                f"expected class ids of shape [batch] = [{outputs.shape[0]}], got {tuple(target.shape)}.",
            )
        self._check_class_dtype(task, target)

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        self._check_class_range(task, target, outputs.shape[-1])

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        labelled = target != IGNORE_INDEX
        return Prepared(outputs, torch.where(labelled, target, 0).long(), labelled)

    def loss_terms(
        self, task: Task, loss: TaskLoss, outputs: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        return class_loss_terms(self, task, loss, outputs, target)

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        keep = ~missing_mask(target)
        logits, target = outputs[keep], target[keep].long()
        return Masked(logits, target, logits.detach().float(), target, int(keep.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": self._label(task, best),
                    "probability": row[best],
                    "probabilities": {self._label(task, i): p for i, p in enumerate(row)},
                }
            )
        return out


def class_loss_terms(
    kind: TaskKind, task: Task, loss: TaskLoss, logits: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over the labelled elements in one call (``ignore_index=-100``, class scores in
    dimension 1) and the labelled count: the multiclass, token and dense kinds' fast path; other losses go
    through :meth:`TaskKind.loss_terms`."""
    if loss.name != "ce" or not loss.builtin:
        return TaskKind.loss_terms(kind, task, loss, logits, target)
    if target.dtype != torch.long:
        target = target.long()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (target != IGNORE_INDEX).sum()
