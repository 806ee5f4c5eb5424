"""``multiclass``: one of C classes per example, softmax over C logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mtl.kinds.base import Masked, TaskKind, missing_mask, register_kind

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

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c = self.num_outputs(task)
        return {
            "accuracy": lambda: MulticlassAccuracy(num_classes=c, average="micro"),
            "macro_f1": lambda: MulticlassF1Score(num_classes=c, average="macro"),
        }

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if target.shape != (outputs.shape[0],):
            raise self._error(
                task,
                f"expected class ids of shape [batch] = [{outputs.shape[0]}], got {tuple(target.shape)}.",
            )
        self._check_class_range(task, target, outputs.shape[-1])

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        keep = ~missing_mask(target)
        logits, target = outputs[keep], target[keep].long()
        return Masked(logits, target, logits.detach().float(), target, int(keep.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def describe(self, task: Task, probs: Tensor) -> list[dict[str, Any]]:
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
