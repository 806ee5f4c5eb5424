"""``equal``: the plain sum of the task losses."""

from __future__ import annotations

from typing import ClassVar

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer


@register_balancer("equal")
class EqualWeighting(Balancer):
    """Every task weighs 1: ``loss = sum_t L_t``. The usual baseline of the MTL literature.

    Example:
        >>> import torch
        >>> EqualWeighting()({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).loss
        tensor(3.)
    """

    stateful: ClassVar[bool] = False

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        vector = losses.vector
        return Balanced.of(losses, vector.sum(), vector.new_ones(vector.shape))
