"""``Task``: the specification of one task of a multi-task model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_mtl.kinds import LOSSES, TaskKind, TaskLoss, get_kind, list_kinds
from lightning_mtl.specs import build_from_spec

STAGES = ("train", "val", "test")
"""The splits that get their own metrics per task."""


@dataclass
class Task:
    """One task: its name, *kind* and everything that differs from the kind's defaults.

    Args:
        name: the task's name; also the default key of its target in a batch.
        kind: one of :func:`~lightning_mtl.kinds.list_kinds` (``binary``, ``multiclass``, ``multilabel``,
            ``regression``, ``token``, ``dense``). The kind supplies the default head, loss, metrics and
            how outputs become predictions.
        labels: class names (index i names class i); for ``binary``, ``[negative, positive]``.
        num_outputs: head width when there are no label names (e.g. a 3-output regression).
        head: a registered head name (:func:`~lightning_mtl.heads.list_heads`); default from the kind.
        head_kwargs: extra arguments of the head, e.g. ``{"hidden": 256, "dropout": 0.1}`` for ``mlp``.
        loss: ``"ce"``, ``"bce"``, ``"mse"``, ``"l1"``, ``"huber"``, ``"smooth_l1"`` or a
            ``{"class_path": ..., "init_args": ...}`` spec of a module called as ``loss(input, target)``
            on the masked outputs (missing labels already removed).
        metrics: ``None`` for the kind's preset, a list of preset names to keep, or a dict
            ``name -> {"class_path": ..., "init_args": ...}`` of torchmetrics metrics.
        weight: static loss weight used by the ``static`` balancer (the default one).
        target_key: key of the target in a batch (default, or ``""``: ``name``).
        feature_key: which backbone feature the head reads when the backbone returns a dict
            (default from the kind: ``pooled``, ``tokens`` for token tasks, ``spatial`` for dense ones).
        threshold: decision threshold for ``binary``/``multilabel`` predictions and metrics.
        target_transform: ``regression`` only: ``"log1p"`` trains the head on ``log1p(target)``
            (e.g. a skewed length of stay) while metrics and predictions stay in the target's units.

    Example:
        >>> t = Task("topic", kind="multiclass", labels=["business", "sport"])
        >>> t.target_key, t.head_name, t.out_features
        ('topic', 'linear', 2)
        >>> Task.from_dict(t.to_dict()) == t
        True
    """

    name: str
    kind: str
    labels: list[str] | None = None
    num_outputs: int | None = None
    head: str | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str | dict[str, Any] | None = None
    metrics: list[str] | dict[str, dict[str, Any]] | None = None
    weight: float = 1.0
    target_key: str = ""
    feature_key: str = ""
    threshold: float = 0.5
    target_transform: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"Task name must be a non-empty string without '/', got {self.name!r}.")
        if self.kind not in list_kinds():
            raise ValueError(f"Task {self.name!r}: unknown kind {self.kind!r}; choose one of {list_kinds()}.")
        if self.labels is not None:
            self.labels = [str(label) for label in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"Task {self.name!r}: duplicate label names in {self.labels}.")
        if not self.target_key:
            self.target_key = self.name
        if not self.feature_key:
            self.feature_key = self.kind_obj.feature_key
        if self.head is None:
            self.head = self.kind_obj.default_head
        if self.weight < 0:
            raise ValueError(f"Task {self.name!r}: weight must be >= 0, got {self.weight}.")
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise ValueError(
                f"Task {self.name!r}: unknown loss {self.loss!r}; choose one of {sorted(LOSSES)} or give a class_path spec."
            )
        if self.target_transform is not None:
            supported = sorted(getattr(self.kind_obj, "target_transforms", {}))
            if self.target_transform not in supported:
                raise ValueError(
                    f"Task {self.name!r}: target_transform {self.target_transform!r} is not supported by kind "
                    f"{self.kind!r}; {'choose one of ' + str(supported) if supported else 'use None'}."
                )
        self.out_features  # noqa: B018 - validates labels / num_outputs early

    # --- derived --------------------------------------------------------------------------------
    @property
    def kind_obj(self) -> TaskKind:
        """The :class:`~lightning_mtl.kinds.TaskKind` that supplies this task's defaults."""
        return get_kind(self.kind)

    @property
    def head_name(self) -> str:
        return self.head or self.kind_obj.default_head

    @property
    def out_features(self) -> int:
        """Width of the head output."""
        return self.kind_obj.num_outputs(self)

    def build_loss(self) -> TaskLoss:
        """The task's :class:`~lightning_mtl.kinds.TaskLoss`: evaluated per element, so that missing labels
        are weighed out without a host read (a loss module with a ``reduction`` attribute is switched to
        ``"none"``; a callable that only reduces is given the labelled elements instead)."""
        if self.loss is None or isinstance(self.loss, str):
            name = self.loss or self.kind_obj.default_loss
            return TaskLoss(LOSSES[name], name)
        return TaskLoss(build_from_spec(self.loss, nn.Module, f"Task {self.name!r} loss"))

    def build_metrics(self) -> MetricCollection:
        """A fresh torchmetrics collection for one split."""
        presets = self.kind_obj.metric_presets(self)
        if self.metrics is None:
            return MetricCollection({k: f() for k, f in presets.items()})
        if isinstance(self.metrics, Mapping):
            return MetricCollection(
                {
                    k: build_from_spec(v, Metric, f"Task {self.name!r} metric {k!r}")
                    for k, v in self.metrics.items()
                }
            )
        unknown = [m for m in self.metrics if m not in presets]
        if unknown:
            raise ValueError(
                f"Task {self.name!r}: unknown metric(s) {unknown}; kind {self.kind!r} offers {sorted(presets)}."
            )
        return MetricCollection({k: presets[k]() for k in self.metrics})

    def describe(self, outputs: Tensor, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        """Raw head outputs -> a readable prediction per example (``lengths``: real tokens per example,
        for token-level kinds)."""
        kind = self.kind_obj
        return kind.describe(self, kind.postprocess(self, outputs).cpu(), lengths)

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (checkpoint hyper-parameters, ``config.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"Task spec has unknown keys {sorted(unknown)}; known keys: {sorted(fields)}.")
        return cls(**dict(data))

    @classmethod
    def coerce(cls, spec: Task | Mapping[str, Any]) -> Task:
        """Accept a ``Task`` or its dict form."""
        if isinstance(spec, Task):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        raise TypeError(f"Expected a Task or a dict, got {type(spec).__name__}: {spec!r}.")
