"""``rlw``: Random Loss Weighting (Lin et al., 2022)."""

from __future__ import annotations

import torch

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer


@register_balancer("rlw")
class RandomLossWeighting(Balancer):
    """Lin, Ye, Xu, Shi, Zhang & Kwok (2022), "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning" (TMLR).

    Every step draws ``lambda ~ N(0, I)`` over all ``K`` tasks and weighs the losses by
    ``softmax(lambda)`` (the paper's default distribution); the present tasks' weights are used.

    Args:
        seed: with the step counter ``calls``, seeds the draw: every DDP rank draws the same weights and a
            resumed run draws the same ones as an uninterrupted run.

    Hyper-parameters: none.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> b = RandomLossWeighting(seed=0)
        >>> b.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> w = b({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).weights
        >>> round(float(w["a"] + w["b"]), 6)
        1.0
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        device = losses.vector.device
        draw = torch.randn(len(losses.task_names), generator=self.generator(device), device=device)
        weights = torch.softmax(draw, dim=0) * losses.present
        return self.weighted_sum(losses, weights)
