"""``gradvac``: raise the cosine similarity of each pair of task gradients to an adaptive target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import normalized_gram, presence, random_orders
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

#: Squared gradient norms below this fraction of the mean count as zero: nothing is added of them.
ZERO_ROW = 1e-12


@register_balancer("gradvac")
class GradVac(GradientBalancer):
    """Gradient Vaccine: when ``cos(g_i', g_j)`` falls below its EMA target, add the multiple of ``g_j``
    that brings it back to the target; ``d = sum_i g_i'``.

    Wang, Tsvetkov, Firat & Cao, 2021, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models" (ICLR). PCGrad's target is always 0; GradVac's target
    ``phi_hat[i, j]`` follows the observed similarities ``phi_hat <- (1 - beta) phi_hat + beta phi``
    (updated for every visited pair, as in the paper's algorithm and TorchJD).

    Computed from the Gram matrix like :class:`~lightning_mtl.balancing.pcgrad.PCGrad` (``g_i' = sum_k
    C_ik g_k``, every task's ``k``-th visit at once); each task visits the others in a random order from
    :meth:`generator` (one ``T x T`` draw, :func:`~lightning_mtl.balancing._solvers.random_orders`).
    ``phi_hat`` is a ``T x T`` buffer (starts at 0), so it is checkpointed; the targets of the pairs that
    involve an absent task are left as they are (an absent task is visited, but adds nothing). Whole-model
    granularity (one Jacobian row per task), no layer-wise grouping.

    Args:
        beta: EMA rate of the targets. Default 0.5, as LibMTL and TorchJD (comparable with their
            benchmarks); the paper used ``1e-2`` (pass ``beta=0.01``).
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> vac = GradVac()
        >>> vac.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> vac.weights_from_gram(jac @ jac.T)  # target 0 at first: PCGrad's projection
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> vac.targets  # phi_hat <- 0.5 * cos(g_a, g_b) = 0.5 * (-1 / sqrt(2))
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]])
    """

    targets: Tensor  # phi_hat[i, j], indexed like task_names (created in setup)

    def __init__(
        self,
        beta: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}.")
        self.beta = float(beta)

    def setup(self, tasks: Sequence[object]) -> None:  # type: ignore[override]
        old_names, old = list(self.task_names), getattr(self, "targets", None)
        super().setup(tasks)
        n = len(self.task_names)
        targets = torch.zeros(n, n, device=self.calls.device)
        if old is not None:  # keep the targets of the tasks that stay
            kept = [t for t in old_names if t in self.task_names]
            src = torch.tensor([old_names.index(t) for t in kept], dtype=torch.long)
            dst = torch.tensor([self.task_names.index(t) for t in kept], dtype=torch.long)
            targets[dst[:, None], dst] = old[src[:, None], src].to(targets)
        self.register_buffer("targets", targets)

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        n, dtype, device = gn.shape[0], gn.dtype, gn.device
        if n == 1:  # no pair to visit
            return torch.where(finite, present.to(dtype), torch.nan)
        order = random_orders(self.generator(device), n, device)  # (n, n - 1): task i visits order[i, k]
        sq = gn.diagonal()
        floor = ZERO_ROW / present.sum().clamp_min(1)
        valid = (sq > floor)[order]  # nothing is added of a zero gradient (or an absent task's)
        targets = self.targets.to(dtype)
        target = targets.gather(1, order)  # phi_hat[i, j] for every visit
        sin_target = (1 - target * target).clamp_min(0.0).sqrt()
        # With g_i' = sum_k C_ik g_k, |g_i'| sin(phi) is the part of g_i' orthogonal to g_j, |g_i'| cos(phi) is
        # (g_i' . g_j) / |g_j|, so the paper's |g_i'| (phi_hat sin(phi) - cos(phi) sin(phi_hat)) / (|g_j| sin(phi_hat))
        # reads a * perp - b * (g_i' . g_j); it is > 0 exactly when phi < phi_hat.
        norm_o = sq.sqrt()[order]  # |g_j| for every visit
        inv_norm = torch.where(valid, norm_o.reciprocal(), 0.0)
        scale = inv_norm / sin_target.clamp_min(1e-6)
        a, b, inv_sq = target * scale, sin_target * scale * inv_norm, inv_norm * inv_norm
        # state[i] = [C_i | (C G)_i]; adding w g_j to g_i' adds w [e_j | G_j]
        state = torch.cat([torch.diag(present.to(dtype)), gn], 1)
        coef, cg = state[:, :n], state[:, n:]
        updates = torch.cat([torch.eye(n, dtype=dtype, device=device), gn], 1)[order]
        columns = [t.unsqueeze(-1).unbind(1) for t in (order, a, b, inv_sq)]
        dots, norms2 = [], []
        for update, j, a_k, b_k, inv_k in zip(updates.unbind(1), *columns):
            cross = cg.gather(1, j)  # g_i' . g_j
            norm2 = (coef * cg).sum(1, keepdim=True)  # |g_i'|^2
            perp = torch.addcmul(norm2, cross * cross, inv_k, value=-1.0).clamp_min_(0.0).sqrt_()
            w = torch.addcmul(a_k * perp, b_k, cross, value=-1.0).clamp_min_(0.0)
            state.addcmul_(w, update)
            dots.append(cross)
            norms2.append(norm2)
        # phi_hat <- (1 - beta) phi_hat + beta phi on every visited pair of present tasks (an fp16 overflow, a
        # step the GradScaler skips, must not poison the targets).
        norm_i = torch.cat(norms2, 1).clamp_min(0.0).sqrt()
        cos = torch.cat(dots, 1) / (norm_i * norm_o).clamp_min(floor)
        phi = targets.scatter(1, order, torch.lerp(target, cos, self.beta))
        self.targets.copy_(torch.where(present[:, None] & present & finite, phi, targets))
        return torch.where(finite, coef.sum(0), torch.nan)
