"""``uncertainty``: learned homoscedastic-uncertainty weights (Kendall et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_balancer("uncertainty")
class UncertaintyWeighting(Balancer):
    """Kendall, Gal & Cipolla (2018), "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
    and Semantics" (CVPR).

    Each task has a learned log-variance ``s_t = log sigma_t^2`` (an ``nn.Parameter`` the module's
    optimizer trains at ``head_lr``): ``loss = sum_t 0.5 exp(-s_t) L_t + 0.5 s_t``. A noisy task raises
    its ``s_t`` and so lowers its weight ``0.5 exp(-s_t)``; the ``0.5 s_t`` term stops ``s_t`` growing forever.

    Hyper-parameters: none (``s_t`` starts at 0, the paper's initialisation, so every weight starts at 0.5).

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> b = UncertaintyWeighting()
        >>> b.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> out = b({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
        >>> out.loss.detach(), out.weights["a"]
        (tensor(3.), tensor(0.5000))
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(0))

    def setup(self, tasks: Sequence[Task]) -> None:
        super().setup(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names), device=self.calls.device))

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        s = self.log_vars.to(losses.vector.device)
        weights = 0.5 * torch.exp(-s)
        # Tasks without a label in this step add nothing (not even their 0.5 s_t regulariser).
        total = torch.where(losses.present, weights * losses.vector + 0.5 * s, 0.0).sum()
        return Balanced.of(losses, total, weights.detach())
