"""``equal``: the plain sum of the task losses."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lightning_mtl.balancing.base import Balanced, Balancer, register_balancer


@register_balancer("equal")
class EqualWeighting(Balancer):
    """Every task weighs 1: ``loss = sum_t L_t``. The usual baseline of the MTL literature.

    Example:
        >>> import torch
        >>> EqualWeighting()({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).loss
        tensor(3.)
    """

    def forward(self, losses: Mapping[str, Tensor]) -> Balanced:
        return self.weighted_sum(losses, dict.fromkeys(losses, 1.0))
