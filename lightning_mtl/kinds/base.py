"""The base class of task kinds: what a kind decides for a task that does not say otherwise.

A kind owns everything that depends on the shape of a task's targets: how a batch's labels are collated,
checked, weighed in the loss (missing labels count for nothing), fed to the metrics and turned into
readable predictions. The training step calls only :meth:`TaskKind.check_shapes` (shapes and dtypes, no
device read) and :meth:`TaskKind.loss_terms` (dense shapes, no device->host synchronisation);
:meth:`TaskKind.check` (label values) runs on the first batches of a stage, :meth:`TaskKind.mask` (drops the
missing labels by boolean indexing, which reads the device) feeds the metrics.
"""

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
class Prepared:
    """A task's outputs and targets on dense shapes (no example dropped), for an element-wise loss.

    ``input``/``target`` go to the loss with no reduction; ``labelled`` (bool, the shape of the element-wise
    loss) marks the elements that have a label. Missing labels in ``target`` hold a valid placeholder (0), so
    that every loss stays finite there before it is weighted out.
    """

    input: Tensor
    target: Tensor
    labelled: Tensor


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
    """``True`` where a label is missing: NaN or ``-100`` for float targets, ``-100`` for integer ones.

    Other negative integers are not "missing": :meth:`TaskKind.check` refuses them with a clear error.
    """
    if target.is_floating_point():
        return torch.isnan(target) | (target == IGNORE_INDEX)
    return target == IGNORE_INDEX


LOSSES: dict[str, Callable[..., Tensor]] = {
    "bce": F.binary_cross_entropy_with_logits,
    "ce": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "smooth_l1": F.smooth_l1_loss,
}
"""The built-in losses by name: ``torch.nn.functional`` functions, called as ``fn(input, target, reduction=...)``."""


class TaskLoss:
    """A task's loss evaluated per element (no reduction), so that missing labels are weighed out on dense
    shapes without reading the device.

    ``fn``: a :data:`LOSSES` function, or a loss module; a module with a ``reduction`` attribute (every
    ``torch.nn`` loss) is switched to ``reduction="none"``. A callable that can only reduce
    (``elementwise=False``) is given the labelled elements instead (boolean indexing: one device->host
    synchronisation per step).

    Example:
        >>> loss = TaskLoss(F.mse_loss)
        >>> loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        tensor([1., 4.])
    """

    def __init__(self, fn: Callable[..., Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or next((k for k, v in LOSSES.items() if v is fn), None)
        self.builtin = self.name is not None and LOSSES.get(self.name) is fn
        self.elementwise = self.builtin or isinstance(getattr(fn, "reduction", None), str)
        if isinstance(getattr(fn, "reduction", None), str):
            fn.reduction = "none"  # type: ignore[attr-defined]

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        """Per-element losses (``elementwise``), else the callable's own reduction."""
        if self.builtin:
            return self.fn(input, target, reduction="none")
        return self.fn(input, target)

    def __repr__(self) -> str:
        return f"TaskLoss({self.name or getattr(self.fn, '__name__', type(self.fn).__name__)})"


def masked_sum(values: Tensor, labelled: Tensor) -> Tensor:
    """``sum(values where labelled)``; NaN or inf at unlabelled elements do not leak in (no host read)."""
    return torch.where(labelled, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


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
    min_outputs: ClassVar[int] = 1
    """The fewest classes (head outputs) the kind can learn: 2 for softmax kinds (one class is a constant)."""
    label_level: ClassVar[str] = "example"
    """``"example"`` (one label per example), ``"token"`` (one per sub-word token: the data module aligns
    word labels to tokens and pads them with -100) or ``"pixel"``."""

    def num_outputs(self, task: Task) -> int:
        """Width of the head's output."""
        if task.num_outputs is not None:
            width = int(task.num_outputs)
        elif task.labels:
            width = len(task.labels)
        else:
            raise ValueError(
                f"Task {task.name!r} (kind {self.name!r}) needs `labels=[...]` or `num_outputs=N` to size its head."
            )
        if width < self.min_outputs:
            hint = " use kind='binary' for a yes/no task, or" if self.name == "multiclass" else ""
            raise ValueError(
                f"Task {task.name!r}: kind {self.name!r} needs >= {self.min_outputs} classes, got {width} "
                f"(labels={task.labels}, num_outputs={task.num_outputs});{hint} give >= {self.min_outputs} labels."
            )
        return width

    def metric_presets(self, task: Task) -> dict[str, Callable[[], Metric]]:
        """Named metric factories; ``Task.metrics`` may select a subset by name."""
        raise NotImplementedError

    def check_shapes(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        """Raise a clear error if ``target``'s shape or dtype cannot match ``outputs``. Reads only shapes and
        dtypes (no device synchronisation): it runs on every step."""
        raise NotImplementedError

    def check(self, task: Task, outputs: Tensor, target: Tensor) -> None:
        """:meth:`check_shapes`, then the label values (class range, 0/1, ...). Reads the device: the module
        runs it on the first batches of each stage only (``MultiTaskModule(check_inputs=...)``)."""
        raise NotImplementedError

    def prepare(self, task: Task, outputs: Tensor, target: Tensor) -> Prepared:
        """Outputs and targets on dense shapes for an element-wise loss, with the labelled elements."""
        raise NotImplementedError

    def loss_terms(
        self, task: Task, loss: TaskLoss, outputs: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(sum of the loss over the labelled elements, number of labelled elements)`` without a host read.

        The task's loss is ``sum / max(count, 1)``: the mean over labelled elements, 0 when none is.
        A loss that cannot be evaluated per element gets the labelled elements (:meth:`mask`) instead.
        """
        if not loss.elementwise:
            masked = self.mask(task, outputs, target)
            count = torch.tensor(float(masked.count), device=outputs.device)
            value = loss(masked.loss_input, masked.loss_target) if masked.count else outputs.sum() * 0.0
            return value * count, count
        prep = self.prepare(task, outputs, target)
        values = loss(prep.input, prep.target)
        if values.shape != prep.labelled.shape:
            raise ValueError(
                f"Task {task.name!r}: its loss {loss!r} returned shape {tuple(values.shape)} for per-element values "
                f"of shape {tuple(prep.labelled.shape)}; a loss module must honour reduction='none'."
            )
        return masked_sum(values, prep.labelled), prep.labelled.sum()

    def mask(self, task: Task, outputs: Tensor, target: Tensor) -> Masked:
        """Drop missing labels (boolean indexing: reads the device) and shape outputs/targets for the
        metrics (and for losses that cannot be evaluated per element)."""
        raise NotImplementedError

    def collate(self, task: Task, values: list[Any], width: int) -> Tensor:
        """Stack one task's labels of a batch of examples (``None``/NaN: missing); ``width`` is the padded
        ``input_ids`` length, for token-level labels."""
        import math

        dtype = self.target_dtype
        missing: float = math.nan if dtype.is_floating_point else IGNORE_INDEX
        present = [v for v in values if not _is_missing(v)]
        if not present:
            return torch.full(self.missing_shape(task, len(values)), missing, dtype=dtype)
        template = as_tensor(present[0], task.target_key)
        rows = []
        for v in values:
            if _is_missing(v):
                rows.append(torch.full(template.shape, missing, dtype=dtype))
                continue
            t = as_tensor(v, task.target_key)
            if t.shape != template.shape:
                raise ValueError(
                    f"Task {task.name!r}, key {task.target_key!r}: labels of different shapes "
                    f"{tuple(template.shape)} and {tuple(t.shape)} in one batch."
                )
            if t.is_floating_point() and not dtype.is_floating_point:
                t = torch.where(torch.isnan(t), torch.full_like(t, IGNORE_INDEX), t)
            rows.append(t.to(dtype))
        return torch.stack(rows)

    def missing_shape(self, task: Task, n: int) -> tuple[int, ...]:
        """The shape of ``n`` examples' labels when none of them has one (the collator fills it)."""
        return (n,)

    def postprocess(self, task: Task, outputs: Tensor) -> Tensor:
        """Raw head outputs -> probabilities (classification) or values (regression)."""
        raise NotImplementedError

    def describe(self, task: Task, probs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        """Post-processed outputs -> one readable prediction per example (label names, probabilities).
        ``lengths``: the number of real (unpadded) tokens of each example, for token-level kinds."""
        raise NotImplementedError

    # --- shared helpers -------------------------------------------------------------------------
    @staticmethod
    def _error(task: Task, message: str) -> ValueError:
        return ValueError(f"Task {task.name!r}, target key {task.target_key!r}: {message}")

    def _check_class_dtype(self, task: Task, target: Tensor) -> None:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise self._error(task, f"expected integer class ids (torch.long), got dtype {target.dtype}.")

    def _check_class_range(self, task: Task, target: Tensor, num_classes: int) -> None:
        self._check_class_dtype(task, target)
        valid = target[target != IGNORE_INDEX]
        if not valid.numel():
            return
        low, high = int(valid.min()), int(valid.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise self._error(
                task,
                f"class id {bad} is out of range for {num_classes} classes (labels {task.labels}); use ids "
                f"0..{num_classes - 1}, or {IGNORE_INDEX} for a missing label.",
            )

    def _label(self, task: Task, index: int) -> str:
        return task.labels[index] if task.labels else str(index)


def _is_missing(value: Any) -> bool:
    import math

    return value is None or (isinstance(value, float) and math.isnan(value))


def as_tensor(value: Any, key: str) -> Tensor:
    """``value`` as a tensor, or a ``TypeError`` naming the batch ``key`` it came from."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"Key {key!r}: cannot make a tensor of {type(value).__name__} {value!r:.60}: {err}"
        ) from None
