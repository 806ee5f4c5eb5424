"""``gls``: the geometric loss strategy (Chennupati et al., 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer


@register_balancer("gls")
class GeometricLossStrategy(Balancer):
    """Chennupati, Sistu, Yogamani & Rawashdeh (2019), "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning" (CVPR Workshops).

    The geometric mean of the losses, ``loss = (prod_t L_t)^(1/K)`` over the ``K`` present tasks, computed
    as ``exp(mean_t log L_t)``. Its gradient weighs task ``t`` by ``loss / (K L_t)``: small losses count more.

    Hyper-parameters: none.

    A task whose loss is ``<= 0`` (solved exactly, or a loss that can be negative) has no logarithm: it is
    left out of the product for that step (``K`` counts only the positive losses) and gets weight 0. If no
    loss is positive, the loss is 0 with zero gradients.

    Example:
        >>> import torch
        >>> out = GeometricLossStrategy()({"a": torch.tensor(1.0), "b": torch.tensor(4.0)})
        >>> out.loss, out.weights
        (tensor(2.), {'a': tensor(1.), 'b': tensor(0.2500)})
    """

    stateful: ClassVar[bool] = False

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        values = losses.vector
        positive = (values > 0) & losses.present
        count = positive.sum().clamp_min(1)
        # log of 1 where the loss is not positive: no -inf and no NaN gradient through the unused branch.
        logs = torch.log(torch.where(positive, values, torch.ones_like(values)))
        total = torch.exp(logs.sum() / count) * positive.any()
        implied = torch.where(
            positive, total.detach() / (count * torch.where(positive, values, torch.ones_like(values))), 0.0
        ).detach()
        return Balanced.of(losses, total, implied)
