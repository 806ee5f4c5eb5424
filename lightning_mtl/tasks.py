"""``Task``: the specification of one task of a multi-task model."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_mtl.kinds import LOSSES, TaskKind, TaskLoss, get_kind, list_kinds
from lightning_mtl.specs import build_from_spec

STAGES = ("train", "val", "test")
"""The splits that get their own metrics per task."""

RESERVED_NAMES = frozenset({"extra"})
"""Task names the module's logging keys use: ``train/extra/<term>`` logs the extra loss terms."""

_MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def _check_name(name: Any) -> None:
    """A task name must be usable as a ``ModuleDict`` key and in ``<stage>/<task>/<metric>`` logging keys."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"Task name must be a non-empty string without '/' or '.', got {name!r}; e.g. Task('risk', ...)."
        )
    if "." in name:
        raise ValueError(
            f"Task name {name!r} contains '.', which cannot name a submodule; rename it, e.g. "
            f"{name.replace('.', '_')!r} (target_key={name!r} keeps reading the same batch key)."
        )
    if name in _MODULE_ATTRIBUTES or name in RESERVED_NAMES:
        raise ValueError(
            f"Task name {name!r} is reserved (an nn.Module attribute or a logging key); rename it, e.g. "
            f"{name + '_task'!r} (target_key={name!r} keeps reading the same batch key)."
        )


def _check_real(task: str, key: str, value: Any, expected: str) -> None:
    """``value`` must be a finite real number (not a bool): ``TypeError``/``ValueError`` naming the task."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Task {task!r}: {key} must be {expected}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"Task {task!r}: {key} must be {expected}, got {value}.")


@dataclass
class Task:
    """One task: its name, *kind* and everything that differs from the kind's defaults.

    Args:
        name: the task's name; also the default key of its target in a batch. It names a submodule and
            logging keys, so it may not contain ``/`` or ``.``, nor be an ``nn.Module`` attribute
            (``training``, ``forward``, ...) or in :data:`RESERVED_NAMES`.
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
        _check_name(self.name)
        if not isinstance(self.kind, str) or self.kind not in list_kinds():
            raise ValueError(f"Task {self.name!r}: unknown kind {self.kind!r}; choose one of {list_kinds()}.")
        if self.labels is not None:
            if isinstance(self.labels, (str, bytes, Mapping)) or not isinstance(self.labels, Iterable):
                raise TypeError(
                    f"Task {self.name!r}: labels must be a list of class names, got {type(self.labels).__name__} "
                    f"{self.labels!r}; pass e.g. labels=['no', 'yes']."
                )
            self.labels = [str(label) for label in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"Task {self.name!r}: duplicate label names in {self.labels}.")
        if self.num_outputs is not None:
            self._check_num_outputs()
        for key in ("target_key", "feature_key"):
            if not isinstance(getattr(self, key), str):
                raise TypeError(
                    f"Task {self.name!r}: {key} must be a string (a batch key), got "
                    f"{type(getattr(self, key)).__name__} {getattr(self, key)!r}; leave it '' for the default."
                )
        if not self.target_key:
            self.target_key = self.name
        if not self.feature_key:
            self.feature_key = self.kind_obj.feature_key
        if self.head is None:
            self.head = self.kind_obj.default_head
        if not isinstance(self.head_kwargs, Mapping):
            raise TypeError(
                f"Task {self.name!r}: head_kwargs must be a dict of head arguments, got "
                f"{type(self.head_kwargs).__name__} {self.head_kwargs!r}; e.g. head_kwargs={{'hidden': 64}}."
            )
        _check_real(self.name, "weight", self.weight, "a number >= 0, e.g. weight=1.0")
        if self.weight < 0:
            raise ValueError(f"Task {self.name!r}: weight must be >= 0, got {self.weight}.")
        _check_real(self.name, "threshold", self.threshold, "a probability between 0 and 1, e.g. 0.5")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"Task {self.name!r}: threshold must be a probability between 0 and 1, got {self.threshold}; "
                "e.g. threshold=0.5."
            )
        self._check_loss()
        if self.metrics is not None and (
            isinstance(self.metrics, (str, bytes)) or not isinstance(self.metrics, (Mapping, list, tuple))
        ):
            raise TypeError(
                f"Task {self.name!r}: metrics must be None, a list of preset names or a dict of specs, got "
                f"{type(self.metrics).__name__} {self.metrics!r}; e.g. metrics=[{self.metrics!r}]."
            )
        if self.target_transform is not None:
            supported = sorted(getattr(self.kind_obj, "target_transforms", {}))
            if self.target_transform not in supported:
                raise ValueError(
                    f"Task {self.name!r}: target_transform {self.target_transform!r} is not supported by kind "
                    f"{self.kind!r}; {'choose one of ' + str(supported) if supported else 'use None'}."
                )
        self.out_features  # noqa: B018 - validates labels / num_outputs early

    def _check_num_outputs(self) -> None:
        n: Any = self.num_outputs
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(
                f"Task {self.name!r}: num_outputs must be an integer >= 1, got {type(n).__name__} {n!r}; "
                "e.g. num_outputs=3."
            )
        if n < 1:
            raise ValueError(
                f"Task {self.name!r}: num_outputs must be >= 1 (the head's width), got {n}; "
                "e.g. num_outputs=3, or leave it None and give labels=[...]."
            )
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(
                f"Task {self.name!r}: num_outputs={n} but labels name {len(self.labels)} classes "
                f"({self.labels}); give one of them, or as many labels as num_outputs."
            )

    def _check_loss(self) -> None:
        if self.loss is None:
            return
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise ValueError(
                    f"Task {self.name!r}: unknown loss {self.loss!r}; choose one of {sorted(LOSSES)} or give a "
                    "class_path spec."
                )
            return
        if not isinstance(self.loss, Mapping) or "class_path" not in self.loss:
            raise TypeError(
                f"Task {self.name!r}: loss must be a name ({sorted(LOSSES)}) or a spec: expected a dict with "
                f"'class_path' (and optional 'init_args'), got {type(self.loss).__name__} {self.loss!r:.80}; "
                "e.g. loss={'class_path': 'torch.nn.HuberLoss'}."
            )

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
        missing = [k for k in ("name", "kind") if k not in data]
        if missing:
            raise ValueError(
                f"Task spec {dict(data)!r:.120} lacks required key(s) {missing}; give e.g. "
                "{'name': 'risk', 'kind': 'binary', ...}."
            )
        return cls(**dict(data))

    @classmethod
    def coerce(cls, spec: Task | Mapping[str, Any]) -> Task:
        """Accept a ``Task`` or its dict form."""
        if isinstance(spec, Task):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        raise TypeError(f"Expected a Task or a dict, got {type(spec).__name__}: {spec!r}.")
