"""The base class of task kinds: what a kind decides for a task that does not say otherwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_mtl._registry import Registry

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

IGNORE_INDEX = -100

KIND_REGISTRY: Registry[type[TaskKind]] = Registry("task kind")


def register_kind(name: str) -> Callable[[type[TaskKind]], type[TaskKind]]:
    """Register a :class:`TaskKind` subclass under ``name`` (duplicates raise)."""
    register = KIND_REGISTRY.register(name)

    def decorator(cls: type[TaskKind]) -> type[TaskKind]:
        cls.name = name
        return register(cls)

    return decorator


def get_kind(name: str) -> TaskKind:
    """Return an instance of the registered kind ``name``."""
    return KIND_REGISTRY.get(name)()


def list_kinds(filter: str | None = None) -> list[str]:
    """Names of the registered task kinds, e.g. ``['binary', 'dense', ...]``."""
    return KIND_REGISTRY.list(filter)


@dataclass
class Masked:
    """A task's outputs and targets with missing labels removed.

    ``loss_input``/``loss_target`` go to the loss, ``metric_preds``/``metric_target`` to the metrics;
    ``count`` is the number of labelled examples (elements for element-wise kinds).
    """

    loss_input: Tensor
    loss_target: Tensor
    metric_preds: Tensor
    metric_target: Tensor
    count: int


def missing_mask(target: Tensor) -> Tensor:
    """``True`` where a label is missing: NaN for float targets, negative (``-100``) for integer ones."""
    if target.is_floating_point():
        return torch.isnan(target) | (target == IGNORE_INDEX)
    return target < 0


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": F.binary_cross_entropy_with_logits,
    "ce": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "smooth_l1": F.smooth_l1_loss,
}


class TaskKind:
    """Defaults of one task kind. Subclass, set the class attributes, implement the four methods.

    Class attributes declare behaviour, as in torchmetrics:
    ``default_head`` (a registered head name), ``default_loss`` (a key of ``LOSSES``),
    ``feature_key`` (which backbone feature the head reads when the backbone returns a dict),
    ``needs_labels`` (the task must name its classes or give ``num_outputs``).
    """

    name: ClassVar[str] = ""
    default_head: ClassVar[str] = "linear"
    default_loss: ClassVar[str] = "ce"
    feature_key: ClassVar[str] = "pooled"
    needs_labels: ClassVar[bool] = True
    target_dtype: ClassVar[torch.dtype] = torch.long

    def num_outputs(self, task: Task) -> int:
        """Width of the head's output."""
        if task.num_outputs is not None:
            return int(task.num_outputs)
        if task.labels:
            return len(task.labels)
        raise ValueError(
            f"Task {task.name!r} (kind {self.name!r}) needs `labels=[...]` or `num_outputs=N` to size its head."
        )

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        """Named metric factories; ``Task.metrics`` may select a subset by name."""
        raise NotImplementedError

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        """Raise a clear error if ``target`` cannot be a target for ``outputs``."""
        raise NotImplementedError

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        """Drop missing labels and shape outputs/targets for the loss and the metrics."""
        raise NotImplementedError

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        """Raw head outputs -> probabilities (classification) or values (regression)."""
        raise NotImplementedError

    def describe(self, task: Task, probs: Tensor) -> list[dict[str, Any]]:
        """Post-processed outputs -> one readable prediction per example (label names, probabilities)."""
        raise NotImplementedError

    # --- shared helpers -------------------------------------------------------------------------
    @staticmethod
    def _error(task: Task, message: str) -> ValueError:
        return ValueError(f"Task {task.name!r}, target key {task.target_key!r}: {message}")

    def _check_class_range(self, task: Task, target: Tensor, num_classes: int) -> None:
        if target.is_floating_point():
            raise self._error(task, f"expected integer class ids (torch.long), got dtype {target.dtype}.")
        valid = target[target >= 0]
        if valid.numel() and int(valid.max()) >= num_classes:
            raise self._error(
                task,
                f"class id {int(valid.max())} is out of range for {num_classes} classes "
                f"(labels {task.labels}); use ids 0..{num_classes - 1}, or -100 for a missing label.",
            )

    def _label(self, task: Task, index: int) -> str:
        return task.labels[index] if task.labels else str(index)
