"""``dwa``: Dynamic Weight Average (Liu et al., 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_mtl.balancing.base import (
    Balanced,
    Balancer,
    StepContext,
    TaskLosses,
    is_distributed,
    register_balancer,
)

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_balancer("dwa")
class DynamicWeightAverage(Balancer):
    """Liu, Johns & Davison (2019), "End-to-End Multi-Task Learning with Attention" (CVPR): Dynamic Weight Average.

    A task whose epoch-average loss fell slowly gets more weight: ``w_t = K softmax_t(r_t / temperature)``
    with ``r_t = Lbar_t(e-1) / Lbar_t(e-2)``, over all ``K`` tasks (the present ones are used).

    Args:
        temperature: softness of the softmax (paper: 2.0); large values give equal weights.

    Every weight is 1 during the first two epochs; a task missing from either of the last two epochs
    (or with a zero average loss) gets ratio 1. The averages are per step, summed over the DDP ranks once
    per epoch in :meth:`on_train_epoch_end`. Runs without epoch ends (``max_steps`` within one epoch) keep
    weights of 1.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> b = DynamicWeightAverage()
        >>> b.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> for epoch_losses in ([4.0, 4.0], [2.0, 4.0]):
        ...     _ = b({"a": torch.tensor(epoch_losses[0]), "b": torch.tensor(epoch_losses[1])})
        ...     b.on_train_epoch_end()
        >>> b({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}).weights
        {'a': tensor(0.8756), 'b': tensor(1.1244)}
    """

    epoch_sum: Tensor
    epoch_count: Tensor
    history: Tensor
    history_seen: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def setup(self, tasks: Sequence[Task]) -> None:
        super().setup(tasks)
        n, device = len(self.task_names), self.calls.device
        # This epoch's local per-step loss sums and step counts (reduced over ranks at the epoch end).
        self.register_buffer("epoch_sum", torch.zeros(n, device=device))
        self.register_buffer("epoch_count", torch.zeros(n, device=device))
        # Epoch-average losses of the epochs e-1 (row 0) and e-2 (row 1), and whether each was measured.
        self.register_buffer("history", torch.zeros(2, n, device=device))
        self.register_buffer("history_seen", torch.zeros(2, n, dtype=torch.bool, device=device))

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        present = losses.present
        # Dense, in the buffers' own dtype (FSDP may keep buffers in bf16): no index_add_, no host read.
        self.epoch_sum.add_(torch.where(present, losses.vector.detach(), 0.0).to(self.epoch_sum))
        self.epoch_count.add_(present.to(self.epoch_count))

        prev, prev2 = self.history[0], self.history[1]
        valid = self.history_seen.all(0) & (prev2 > 0)
        ratio = torch.where(
            valid, prev / torch.where(valid, prev2, torch.ones_like(prev2)), torch.ones_like(prev)
        )
        weights = len(self.task_names) * torch.softmax(ratio.float() / self.temperature, dim=0)
        return self.weighted_sum(losses, weights.to(losses.vector.device) * present)

    def on_train_epoch_end(self) -> None:
        both = torch.stack([self.epoch_sum.float(), self.epoch_count.float()])
        if is_distributed():
            torch.distributed.all_reduce(both)
        seen = both[1] > 0
        mean = torch.where(seen, both[0] / both[1].clamp_min(1.0), torch.zeros_like(both[0]))
        self.history.copy_(torch.stack([mean, self.history[0].float()]))
        self.history_seen.copy_(torch.stack([seen, self.history_seen[0]]))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
