"""``dense``: one class per pixel (semantic segmentation); pixels labelled -100 are ignored."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_mtl.kinds.base import (
    IGNORE_INDEX,
    Masked,
    Prepared,
    TaskKind,
    TaskLoss,
    missing_mask,
    register_kind,
)
from lightning_mtl.kinds.multiclass import class_loss_terms

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("dense")
class Dense(TaskKind):
    """Targets ``[batch, H, W]`` of class ids (-100: ignore). Head outputs ``[batch, C, h, w]``,
    resized bilinearly to ``H x W`` when smaller. Metrics: pixel accuracy and mean IoU.

    Example:
        >>> from lightning_mtl import Task
        >>> t = Task("seg", kind="dense", labels=["bg", "fg"])
        >>> t.describe(torch.tensor([[[[1.0]], [[0.0]]]]))[0]["mask"]
        [[0]]
    """

    default_head: ClassVar[str] = "dense"
    feature_key: ClassVar[str] = "spatial"
    label_level: ClassVar[str] = "pixel"
    min_outputs: ClassVar[int] = 2

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c = self.num_outputs(task)
        return {
            "pixel_accuracy": lambda: MulticlassAccuracy(num_classes=c, average="micro"),
            "miou": lambda: MulticlassJaccardIndex(num_classes=c, average="macro"),
        }

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if outputs.dim() != 4:
            raise ValueError(
                f"Task {task.name!r}: a dense head must output [batch, C, h, w], got {tuple(outputs.shape)}."
            )
        if target.dim() != 3 or target.shape[0] != outputs.shape[0]:
            raise self._error(
                task,
                f"expected a class map of shape [batch, H, W] with batch={outputs.shape[0]}, got {tuple(target.shape)}.",
            )
        self._check_class_dtype(task, target)

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        self._check_class_range(task, target, outputs.shape[1])

    def _resize(self, outputs: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(outputs.shape[-2:]) != size:
            outputs = F.interpolate(outputs, size=size, mode="bilinear", align_corners=False)
        return outputs

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        outputs = self._resize(outputs, (int(target.shape[-2]), int(target.shape[-1])))
        labelled = target != IGNORE_INDEX
        return Prepared(outputs, torch.where(labelled, target, 0).long(), labelled)

    def loss_terms(
        self, task: Task, loss: TaskLoss, outputs: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        outputs = self._resize(outputs, (int(target.shape[-2]), int(target.shape[-1])))
        return class_loss_terms(self, task, loss, outputs, target)

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        outputs = self._resize(outputs, (int(target.shape[-2]), int(target.shape[-1])))
        keep = ~missing_mask(target)
        logits = outputs.permute(0, 2, 3, 1)[keep]
        target = target[keep].long()
        return Masked(logits, target, logits.detach().float(), target, int(keep.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=1)

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        return [{"mask": m.tolist()} for m in probs.argmax(dim=1)]
