"""``pcgrad``: project each task gradient onto the normal plane of the gradients it conflicts with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer


@register_balancer("pcgrad")
class PCGrad(GradientBalancer):
    """Projecting Conflicting Gradients: ``d = sum_i g_i'`` with the conflicts projected out of each ``g_i``.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS).
    Each task visits the other tasks ``j`` in a random order and, whenever ``g_i' . g_j < 0``, replaces
    ``g_i'`` by its projection onto the normal plane of ``g_j``; the update is the sum of the ``g_i'``.

    Computed exactly from the Gram matrix: ``g_i' = sum_k C_ik g_k`` with ``C = I`` at the start, so
    ``g_i' . g_j = (C G)_ij`` and the projection is ``C_ij -= (C G)_ij / G_jj``; the weights are ``C.sum(0)``.
    The orders come from :meth:`generator` (one ``randperm(T)`` per task, skipping the task itself, as
    TorchJD draws them), so every rank and a resumed run take the same ones. Gradients with
    ``|g_j|^2 <= 1e-12 * mean_t |g_t|^2`` count as zero (nothing is projected onto them).

    No hyper-parameters (the paper has none); ``mode``, ``update_every``, ``jacobian``,
    ``memory_budget_mb``, ``seed``: see :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g_1 . g_2 = -1 < 0
        >>> w = PCGrad().weights_from_gram(jac @ jac.T, ["a", "b"])
        >>> w  # g_1' = g_1 + g_2 / 2, g_2' = g_2 + g_1
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> w @ jac
        tensor([0.5000, 1.5000], dtype=torch.float64)
    """

    def weights_from_gram(self, gram: Tensor, names: Sequence[str]) -> Tensor:
        n, device = gram.shape[0], gram.device
        gen = self.generator(device)
        order = torch.stack([torch.randperm(n, generator=gen, device=device) for _ in range(n)])
        sq = gram.diagonal()
        floor = 1e-12 * sq.sum() / n + torch.finfo(gram.dtype).tiny
        rows = torch.arange(n, device=device)
        coef = torch.eye(n, dtype=gram.dtype, device=device)
        for k in range(n):  # step k: every task i projects against its k-th task j = order[i, k]
            j = order[:, k]
            dot = (coef * gram[j]).sum(1)  # g_i' . g_j
            conflict = (dot < 0) & (j != rows) & (sq[j] > floor)
            coef[rows, j] -= torch.where(conflict, dot / sq[j].clamp_min(floor), 0.0)
        return coef.sum(0)
