"""``token``: one class per token (NER, POS); positions labelled -100 are ignored."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mtl.kinds.base import Masked, TaskKind, missing_mask, register_kind

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_kind("token")
class Token(TaskKind):
    """Targets ``[batch, seq]`` of class ids, -100 where no label (padding, sub-words, special tokens).

    Head outputs ``[batch, seq, C]``; loss: cross-entropy over labelled tokens; metrics: token accuracy
    and macro-F1 over labelled tokens.

    Example:
        >>> from lightning_mtl import Task
        >>> t = Task("ner", kind="token", labels=["O", "B-PER", "I-PER"])
        >>> t.describe(torch.tensor([[[5.0, 0, 0], [0, 5.0, 0]]]))[0]["labels"]
        ['O', 'B-PER']
    """

    default_head: ClassVar[str] = "token"
    feature_key: ClassVar[str] = "tokens"

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c = self.num_outputs(task)
        return {
            "accuracy": lambda: MulticlassAccuracy(num_classes=c, average="micro"),
            "macro_f1": lambda: MulticlassF1Score(num_classes=c, average="macro"),
        }

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if target.shape != outputs.shape[:-1]:
            raise self._error(
                task,
                f"expected token labels of shape [batch, seq] = {list(outputs.shape[:-1])}, got {tuple(target.shape)}.",
            )
        self._check_class_range(task, target, outputs.shape[-1])

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        keep = ~missing_mask(target)
        logits, target = outputs[keep], target[keep].long()
        return Masked(logits, target, logits.detach().float(), target, int(keep.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def describe(self, task: Task, probs: Tensor) -> list[dict[str, Any]]:
        ids = probs.argmax(dim=-1).tolist()
        return [{"labels": [self._label(task, i) for i in row]} for row in ids]
