"""``static``: fixed per-task weights (the default balancer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_balancer("static")
class StaticWeighting(Balancer):
    """``loss = sum_t w_t L_t`` with fixed weights: ``weights`` if given, else each ``Task.weight``
    (1.0 by default, which makes this the equal-weight sum).

    Example:
        >>> import torch
        >>> b = StaticWeighting({"a": 0.5, "b": 2.0})
        >>> b({"a": torch.tensor(2.0), "b": torch.tensor(1.0)}).loss
        tensor(3.)
    """

    uses_task_weights: ClassVar[bool] = True
    stateful: ClassVar[bool] = False
    weight_vector: Tensor

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights: dict[str, float] = {k: float(v) for k, v in (weights or {}).items()}
        self._explicit = weights is not None
        self.register_buffer("weight_vector", torch.ones(0), persistent=False)

    def setup(self, tasks: Sequence[Task]) -> None:
        super().setup(tasks)
        names = {t.name for t in tasks}
        if self._explicit:
            weighted = {t.name: t.weight for t in tasks if t.weight != 1.0}
            if weighted:
                raise ValueError(
                    f"StaticWeighting got explicit weights {self.weights} and tasks {weighted} also set Task.weight; "
                    "give the weights in one place only."
                )
            unknown = set(self.weights) - names
            missing = names - set(self.weights)
            if unknown or missing:
                raise ValueError(
                    f"StaticWeighting weights must name every task exactly: unknown {sorted(unknown)}, "
                    f"missing {sorted(missing)} (tasks: {sorted(names)})."
                )
            if any(w < 0 for w in self.weights.values()):
                raise ValueError(f"StaticWeighting weights must be >= 0, got {self.weights}.")
        else:
            self.weights = {t.name: float(t.weight) for t in tasks}
        self.weight_vector = torch.tensor(
            [self.weights[n] for n in self.task_names], device=self.weight_vector.device
        )

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        if not self.task_names:  # called on a plain dict without setup: its tasks, fixed weights
            self.weights = {n: self.weights.get(n, 1.0) for n in losses.task_names}
            self.task_names = list(losses.task_names)
            self.weight_vector = torch.tensor(list(self.weights.values()), device=losses.vector.device)
        return self.weighted_sum(losses, self.weight_vector)

    def config(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)} if self._explicit else {}

    def extra_repr(self) -> str:
        return f"weights={self.weights}" if self._explicit else ""
