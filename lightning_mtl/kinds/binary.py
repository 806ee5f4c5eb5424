"""``binary``: one logit per example, sigmoid probability of the positive class (``labels[1]``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from lightning_mtl.kinds.base import Masked, Prepared, TaskKind, missing_mask, register_kind

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("binary")
class Binary(TaskKind):
    """Two classes. Targets: 0/1 (int or float); missing: NaN or -100. Loss: BCE with logits.

    Example:
        >>> from lightning_mtl import Task
        >>> t = Task("spam", kind="binary", labels=["ham", "spam"])
        >>> t.describe(torch.tensor([[2.0]]))[0]["label"]
        'spam'
    """

    default_loss: ClassVar[str] = "bce"
    needs_labels: ClassVar[bool] = False
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def num_outputs(self, task: Task) -> int:
        if task.labels is not None and len(task.labels) != 2:
            raise ValueError(
                f"Task {task.name!r} is binary: `labels` must name 2 classes, got {task.labels}."
            )
        if task.num_outputs not in (None, 1):
            raise ValueError(
                f"Task {task.name!r} is binary: its head has 1 output (a logit), got num_outputs={task.num_outputs}; "
                "leave num_outputs None, or use kind='multiclass' / 'multilabel' for several classes."
            )
        return 1

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        t = task.threshold
        return {
            "accuracy": lambda: BinaryAccuracy(threshold=t),
            "f1": lambda: BinaryF1Score(threshold=t),
            "auroc": lambda: BinaryAUROC(),
        }

    def _flat(self, task: Task, outputs: Tensor) -> Tensor:
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            return outputs[:, 0]
        if outputs.dim() != 1:
            raise ValueError(
                f"Task {task.name!r}: a binary head must output [batch] or [batch, 1], got {tuple(outputs.shape)}."
            )
        return outputs

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self._flat(task, outputs)
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != (outputs.shape[0],):
            raise self._error(
                task, f"expected shape [batch] = [{outputs.shape[0]}], got {tuple(target.shape)}."
            )

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        valid = target.reshape(-1)[~missing_mask(target.reshape(-1))]
        if valid.numel() and not bool(((valid == 0) | (valid == 1)).all()):
            raise self._error(
                task,
                f"binary targets must be 0 or 1 (NaN or -100 when missing), got values {valid.unique()[:5].tolist()}.",
            )

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        logits = self._flat(task, outputs)
        target = target.reshape(-1)
        labelled = ~missing_mask(target)
        safe = torch.where(labelled, target, torch.zeros((), dtype=target.dtype, device=target.device))
        return Prepared(logits, safe.to(logits.dtype), labelled)

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        logits = self._flat(task, outputs)
        target = target.reshape(-1)
        keep = ~missing_mask(target)
        logits, target = logits[keep], target[keep]
        return Masked(
            logits, target.float(), torch.sigmoid(logits.detach().float()), target.long(), int(keep.sum())
        )

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.sigmoid(self._flat(task, outputs).float())

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for p in probs.tolist():
            positive = p >= task.threshold
            out.append(
                {
                    "label": self._label(task, int(positive)),
                    "probability": p if positive else 1.0 - p,  # of the predicted label, as for multiclass
                    "probabilities": {self._label(task, 0): 1.0 - p, self._label(task, 1): p},
                }
            )
        return out
