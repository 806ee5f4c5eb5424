"""``TaskUnit``: everything one task owns inside a :class:`~lightning_mtl.MultiTaskModule`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_mtl.heads import create_head
from lightning_mtl.kinds import TaskKind
from lightning_mtl.tasks import STAGES, Task


class TaskUnit(nn.Module):
    """One task's head, loss, metrics and loss means (one collection and one mean per stage).

    The module holds one unit per task (``module.units[name]``), so adding or removing a task touches one
    object. The unit's training-step work never reads the device from the host: :meth:`loss` weighs missing
    labels out on dense shapes (:meth:`~lightning_mtl.kinds.TaskKind.loss_terms`). :meth:`update_metrics`
    does read it (torchmetrics drops missing labels by boolean indexing); the module calls it on every
    validation and test batch and on every ``train_metrics_every``-th training batch.

    Args:
        task: the task's specification.
        in_features: width of the features its head reads.

    Example:
        >>> unit = TaskUnit(Task("risk", kind="binary", labels=["low", "high"]), in_features=4)
        >>> unit(torch.zeros(3, 4)).shape  # the head's logits
        torch.Size([3, 1])
        >>> loss, count = unit.loss(torch.zeros(3, 1), torch.tensor([1.0, float("nan"), 0.0]))
        >>> round(float(loss), 4), int(count)  # the mean over the 2 labelled examples
        (0.6931, 2)
    """

    def __init__(self, task: Task, in_features: int) -> None:
        super().__init__()
        self.task = task
        self._kind = task.kind_obj
        try:
            self.head = create_head(task.head_name, in_features, task.out_features, **task.head_kwargs)
        except (KeyError, TypeError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise type(err)(
                f"Task {task.name!r}: cannot build its head {task.head_name!r} with head_kwargs={task.head_kwargs}: "
                f"{message} Fix Task(head=..., head_kwargs=...)."
            ) from err
        self.loss_fn = task.build_loss()
        if isinstance(self.loss_fn.fn, nn.Module):  # trained and saved with the unit
            self.loss_module = self.loss_fn.fn
        # Keyed "on_<stage>": a ModuleDict key may not shadow an nn.Module attribute such as ``train``.
        self.metrics = nn.ModuleDict({f"on_{stage}": task.build_metrics() for stage in STAGES})
        self.loss_means = nn.ModuleDict({f"on_{stage}": WeightedMean() for stage in STAGES})

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def kind(self) -> TaskKind:
        return self._kind

    def select(self, features: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The features this task's head reads: the tensor itself, or ``features[task.feature_key]``."""
        if isinstance(features, Tensor):
            return features
        if isinstance(features, Mapping):
            if self.task.feature_key not in features:
                raise KeyError(
                    f"Task {self.name!r} reads feature {self.task.feature_key!r}, but the backbone returned "
                    f"{sorted(features)}. Set Task(feature_key=...) to one of those."
                )
            return features[self.task.feature_key]
        raise TypeError(
            f"The backbone must return a tensor or a dict of tensors, got {type(features).__name__}."
        )

    def forward(self, features: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The head's raw outputs for the features it reads."""
        return self.head(self.select(features))  # type: ignore[no-any-return]

    def loss(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean loss over the labelled elements, labelled count)``; 0 and 0 when none is labelled.
        No host read: missing labels are weighed out, not dropped."""
        total, count = self.kind.loss_terms(self.task, self.loss_fn, outputs, target)
        return total / count.clamp_min(1), count

    def own_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters only this task uses: its head's and its loss module's (not walking the
        metric modules, which hold no parameters and are slow to traverse)."""
        params = list(self.head.parameters())
        if hasattr(self, "loss_module"):
            params += list(self.loss_module.parameters())
        return [p for p in params if p.requires_grad]

    # --- metrics ------------------------------------------------------------------------------------
    def collection(self, stage: str) -> MetricCollection:
        return cast(MetricCollection, self.metrics[f"on_{stage}"])

    def loss_mean(self, stage: str) -> WeightedMean:
        return cast(WeightedMean, self.loss_means[f"on_{stage}"])

    def update_metrics(
        self, stage: str, outputs: Tensor, target: Tensor, loss: Tensor, count: Tensor
    ) -> None:
        """Update ``stage``'s metrics with the labelled examples (boolean indexing: reads the device) and its
        loss mean with ``loss`` weighted by ``count``."""
        self.loss_mean(stage).update(loss.detach().float(), weight=count.float())
        masked = self.kind.mask(self.task, outputs.detach(), target)
        if masked.count:
            self.collection(stage).update(masked.metric_preds, masked.metric_target)

    def compute(self, stage: str) -> dict[str, Tensor]:
        """``{"loss": mean, <metric>: value}`` of ``stage`` (NaN for a metric never updated), then reset.
        Computed on every rank (torchmetrics syncs the states under DDP)."""
        collection, mean = self.collection(stage), self.loss_mean(stage)
        values = {"loss": _safe_compute(mean)}
        for key, metric in collection.items():
            values[key] = _safe_compute(metric)
        collection.reset()
        mean.reset()
        return values

    def extra_repr(self) -> str:
        return f"task={self.name!r}, kind={self.task.kind!r}"


class WeightedMean(Metric):
    """``sum(value * weight) / sum(weight)`` over updates, NaN when the weights sum to 0, reduced over DDP
    ranks by torchmetrics. Unlike ``torchmetrics.MeanMetric`` its update reads nothing from the device (no
    NaN check) and honours a weight of 0 (a batch without labels for the task).

    Example:
        >>> mean = WeightedMean()
        >>> mean.update(torch.tensor(2.0), torch.tensor(3.0)); mean.update(torch.tensor(9.0), torch.tensor(0.0))
        >>> mean.compute()
        tensor(2.)
    """

    full_state_update = False
    total: Tensor
    weight: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        self.total += (value.double() * weight.double()).sum()
        self.weight += weight.double().sum()

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()


def _safe_compute(metric: Any) -> Tensor:
    # A metric never updated (e.g. a task absent from this split) still computes, with a warning we silence.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        try:
            value = torch.as_tensor(metric.compute(), dtype=torch.float32)
        except (ValueError, IndexError):  # list-state metrics (e.g. AUROC) cannot compute without samples
            # (IndexError: under DDP, after gathering every rank's empty state, which is then left synced)
            if getattr(metric, "_is_synced", False):
                metric.unsync()
            if getattr(metric, "update_count", None) != 0:
                raise
            return torch.tensor(float("nan"))
    return value if value.numel() == 1 else value.mean()
