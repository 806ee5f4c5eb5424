"""``famo``: Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@register_balancer("famo")
class FAMO(Balancer):
    """Liu, Liang, Zheng & Liu (2023), "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS).

    Descends ``sum_t z_t log(L_t - min_t) / c`` with ``z = softmax(xi)`` and ``c = sum_t z_t / (L_t - min_t)``
    (so the task weights ``z_t / (c (L_t - min_t))`` sum to 1); after each optimizer step the logits ``xi`` take
    one Adam step towards the tasks whose log-loss fell least on the same batch: the log-losses decrease at
    a balanced rate, at O(1) cost.

    Args:
        w_lr: Adam learning rate of the logits (official code: 0.025).
        gamma: L2 decay of the logits, added to their gradient as in ``Adam(weight_decay=gamma)`` (0.001; the
            official ``famo.py`` default is 0.01, its QM9 script uses 0.001).
        min_losses: the lowest value of each loss (0; a float for every task or a ``{task: value}`` dict).
        eps: added to ``L_t - min_t`` before the logarithm (1e-8). A loss below its ``min_losses`` is clamped
            to it (its gradient is then 0) rather than producing a NaN.

    The softmax runs over the tasks present in the batch; a logit update touches only the tasks present
    both before and after the step (the others keep their logits and Adam moments). The official code's
    gradient clipping (``max_norm=1``) is the Trainer's ``gradient_clip_val`` here.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> b = FAMO()
        >>> b.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> before = {"a": torch.tensor(2.0), "b": torch.tensor(2.0)}
        >>> b(before).weights
        {'a': tensor(0.5000), 'b': tensor(0.5000)}
        >>> b.after_step(before, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
        >>> w = b(before).weights
        >>> bool(w["b"] > w["a"])
        True
    """

    needs_post_step_losses: ClassVar[bool] = True

    min_loss: Tensor
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_step: Tensor

    def __init__(
        self,
        w_lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.w_lr = float(w_lr)
        self.gamma = float(gamma)
        self.min_losses = (
            {k: float(v) for k, v in min_losses.items()}
            if isinstance(min_losses, Mapping)
            else float(min_losses)
        )
        self.eps = float(eps)

    def setup(self, tasks: Sequence[Task]) -> None:
        super().setup(tasks)
        n, device = len(self.task_names), self.calls.device
        if isinstance(self.min_losses, dict):
            unknown = sorted(set(self.min_losses) - set(self.task_names))
            if unknown:
                raise ValueError(
                    f"FAMO min_losses names unknown task(s) {unknown}; tasks are {self.task_names}."
                )
            mins = [self.min_losses.get(name, 0.0) for name in self.task_names]
        else:
            mins = [self.min_losses] * n
        self.register_buffer("min_loss", torch.tensor(mins, dtype=torch.float32, device=device))
        self.register_buffer("logits", torch.zeros(n, device=device))
        self.register_buffer("exp_avg", torch.zeros(n, device=device))
        self.register_buffer("exp_avg_sq", torch.zeros(n, device=device))
        self.register_buffer("adam_step", torch.zeros(n, device=device))

    def _shifted(self, values: Tensor, mins: Tensor) -> Tensor:
        """``L - min + eps``, with ``L`` clamped at ``min``."""
        return (values - mins.to(values.device)).clamp_min(0.0) + self.eps

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        values, present = losses.vector, losses.present
        logits = self.logits.to(values.device).float()
        z = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=0)  # over the present tasks
        z = torch.where(present, z, 0.0)  # and 0 (not NaN) when no task is present
        shifted = self._shifted(values, self.min_loss.to(values.device).float())
        c = (z / shifted.detach()).sum().clamp_min(torch.finfo(torch.float32).tiny)
        total = (z * torch.log(shifted)).sum() / c
        weights = z / (c * shifted.detach())
        return Balanced.of(losses, total, weights)

    @torch.no_grad()
    def after_step(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
        before = TaskLosses.coerce(before, self.task_names)
        after = TaskLosses.coerce(after, self.task_names)
        prev, prev_present = self.reduce_per_task(before.vector, before.present)  # collectives: every step
        curr, curr_present = self.reduce_per_task(after.vector, after.present)
        device = self.logits.device
        mask = (prev_present & curr_present).to(device)
        delta = torch.log(self._shifted(prev.to(device), self.min_loss)) - torch.log(
            self._shifted(curr.to(device), self.min_loss)
        )
        delta = torch.where(mask, delta, torch.zeros_like(delta))
        # Softmax over the updated tasks; its Jacobian contracted with delta is z * (delta - <z, delta>).
        z = torch.softmax(self.logits.masked_fill(~mask, float("-inf")), dim=0)
        z = torch.where(mask, z, torch.zeros_like(z))
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits
        # One Adam step on the updated entries (per-task step counts, so bias correction stays exact).
        beta1, beta2 = BETAS
        step = self.adam_step + mask.float()
        exp_avg = beta1 * self.exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * self.exp_avg_sq + (1 - beta2) * grad * grad
        bias1 = 1 - beta1 ** step.clamp_min(1.0)
        bias2 = 1 - beta2 ** step.clamp_min(1.0)
        update = self.w_lr * (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + ADAM_EPS)
        self.logits.copy_(torch.where(mask, self.logits - update, self.logits))
        self.exp_avg.copy_(torch.where(mask, exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(mask, exp_avg_sq, self.exp_avg_sq))
        self.adam_step.copy_(step)
