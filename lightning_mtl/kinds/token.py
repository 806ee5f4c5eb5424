"""``token``: one class per token (NER, POS); positions labelled -100 are ignored."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mtl.kinds.base import (
    IGNORE_INDEX,
    Masked,
    Prepared,
    TaskKind,
    TaskLoss,
    as_tensor,
    missing_mask,
    register_kind,
)
from lightning_mtl.kinds.multiclass import class_loss_terms

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
    label_level: ClassVar[str] = "token"
    min_outputs: ClassVar[int] = 2

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        c = self.num_outputs(task)
        return {
            "accuracy": lambda: MulticlassAccuracy(num_classes=c, average="micro"),
            "macro_f1": lambda: MulticlassF1Score(num_classes=c, average="macro"),
        }

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        if target.shape != outputs.shape[:-1]:
            raise self._error(
                task,
                f"expected token labels of shape [batch, seq] = {list(outputs.shape[:-1])}, got {tuple(target.shape)}.",
            )
        self._check_class_dtype(task, target)

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        self.check_shapes(task, outputs, target)
        self._check_class_range(task, target, outputs.shape[-1])

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        logits, target = outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1)
        labelled = target != IGNORE_INDEX
        return Prepared(logits, torch.where(labelled, target, 0).long(), labelled)

    def loss_terms(
        self, task: Task, loss: TaskLoss, outputs: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        return class_loss_terms(self, task, loss, outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1))

    def collate(self, task: Task, values: list[Any], width: int) -> Tensor:
        """Token labels padded with -100 to the batch's ``input_ids`` width (an example without: all -100)."""
        seqs = [
            torch.full((max(width, 1),), IGNORE_INDEX) if v is None else _as_long(v, task.target_key)
            for v in values
        ]
        length = max(width, *(int(s.shape[0]) for s in seqs))
        out = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
        return out

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        keep = ~missing_mask(target)
        logits, target = outputs[keep], target[keep].long()
        return Masked(logits, target, logits.detach().float(), target, int(keep.sum()))

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        ids = probs.argmax(dim=-1).tolist()
        if lengths is not None:  # drop the padding positions
            ids = [row[: int(n)] for row, n in zip(ids, lengths)]
        return [{"labels": [self._label(task, i) for i in row]} for row in ids]


def _as_long(value: Any, key: str) -> Tensor:
    return as_tensor(value, key).long()
