"""``gradvac``: raise the cosine similarity of each pair of task gradients to an adaptive target."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer


@register_balancer("gradvac")
class GradVac(GradientBalancer):
    """Gradient Vaccine: when ``cos(g_i', g_j)`` falls below its EMA target, add the multiple of ``g_j``
    that brings it back to the target; ``d = sum_i g_i'``.

    Wang, Tsvetkov, Firat & Cao, 2021, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models" (ICLR). PCGrad's target is always 0; GradVac's target
    ``phi_hat[i, j]`` follows the observed similarities ``phi_hat <- (1 - beta) phi_hat + beta phi``
    (updated for every visited pair, as in the paper's algorithm and TorchJD).

    Computed from the Gram matrix like :class:`~lightning_mtl.balancing.pcgrad.PCGrad` (``g_i' = sum_k
    C_ik g_k``); each task visits the others in a random order from :meth:`generator` (one
    ``randperm(T - 1)`` per task, as TorchJD draws them). ``phi_hat`` is a ``T x T`` buffer (starts at 0),
    so it is checkpointed; absent tasks keep their rows. Whole-model granularity (one Jacobian row per
    task), no layer-wise grouping.

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
        >>> vac.weights_from_gram(jac @ jac.T, ["a", "b"])  # target 0 at first: PCGrad's projection
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> vac.targets  # phi_hat <- 0.5 * cos(g_a, g_b) = 0.5 * (-1 / sqrt(2))
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]])
    """

    targets: Tensor  # phi_hat[i, j], indexed like task_names (created in setup)

    def __init__(
        self,
        beta: float = 0.5,
        mode: str = "params",
        update_every: int = 1,
        jacobian: str = "loop",
        memory_budget_mb: float = 2048.0,
        seed: int = 0,
    ) -> None:
        super().__init__(mode, update_every, jacobian, memory_budget_mb, seed)
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

    def weights_from_gram(self, gram: Tensor, names: Sequence[str]) -> Tensor:
        n, dtype, device = gram.shape[0], gram.dtype, gram.device
        idx = self.index(names).to(device)
        phi = self.targets[idx[:, None], idx].to(dtype)  # phi_hat[i, j] for the tasks of this step
        gen = self.generator(device)
        rows = torch.arange(n, device=device)
        perm = torch.stack([torch.randperm(n - 1, generator=gen, device=device) for _ in range(n)])
        order = perm + (perm >= rows[:, None]).long()  # row i: a random order of the tasks j != i
        sq = gram.diagonal().clamp_min(0.0)
        floor = 1e-12 * sq.sum() / n + torch.finfo(dtype).tiny
        norms = sq.sqrt()
        coef = torch.eye(n, dtype=dtype, device=device)
        cg = gram.clone()  # cg[i, k] = g_i' . g_k
        for k in range(n - 1):
            j = order[:, k]
            norm_i = (cg * coef).sum(1).clamp_min(0.0).sqrt()  # |g_i'|
            cos = cg[rows, j] / (norm_i * norms[j]).clamp_min(floor)
            target = phi[rows, j]
            sin, sin_target = (1 - cos**2).clamp_min(0.0).sqrt(), (1 - target**2).clamp_min(0.0).sqrt()
            # |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2))
            w = norm_i * (target * sin - cos * sin_target) / (norms[j] * sin_target.clamp_min(1e-6))
            w = torch.where((cos < target) & (sq[j] > floor), w, 0.0)
            coef[rows, j] += w
            cg += w[:, None] * gram[j]
            phi[rows, j] = (1 - self.beta) * target + self.beta * cos
        # An fp16 overflow (a step the GradScaler skips) must not poison the targets.
        finite = torch.isfinite(gram).all()
        self.targets[idx[:, None], idx] = torch.where(
            finite, phi, self.targets[idx[:, None], idx].to(phi)
        ).to(self.targets)
        return coef.sum(0)
