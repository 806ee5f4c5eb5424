"""``pcgrad``: project each task gradient onto the normal plane of the gradients it conflicts with."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import normalized_gram, presence, random_orders
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

#: Squared gradient norms below this fraction of the mean count as zero: nothing is projected onto them.
ZERO_ROW = 1e-12


@register_balancer("pcgrad")
class PCGrad(GradientBalancer):
    """Projecting Conflicting Gradients: ``d = sum_i g_i'`` with the conflicts projected out of each ``g_i``.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS).
    Each task visits the other tasks ``j`` in a random order and, whenever ``g_i' . g_j < 0``, replaces
    ``g_i'`` by its projection onto the normal plane of ``g_j``; the update is the sum of the ``g_i'``.

    Computed exactly from the Gram matrix: ``g_i' = sum_k C_ik g_k`` with ``C = I`` at the start, so
    ``g_i' . g_j = (C G)_ij`` and the projection is ``C_ij -= min((C G)_ij, 0) / G_jj``; the weights are
    ``C.sum(0)``. Every task takes its ``k``-th projection at once (``T - 1`` steps, ``C`` and ``C G``
    updated together). The orders come from :meth:`generator` (one ``T x T`` draw,
    :func:`~lightning_mtl.balancing._solvers.random_orders`), so every rank and a resumed run take the same
    ones; absent tasks are visited but project nothing, so the present tasks visit each other in a uniformly
    random order. Gradients with ``|g_j|^2 <= 1e-12 * mean_t |g_t|^2`` count as zero (nothing is projected
    onto them).

    No hyper-parameters (the paper has none); ``mode``, ``update_every``, ``jacobian``,
    ``memory_budget_mb``, ``seed``: see :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g_1 . g_2 = -1 < 0
        >>> w = PCGrad().weights_from_gram(jac @ jac.T)
        >>> w  # g_1' = g_1 + g_2 / 2, g_2' = g_2 + g_1
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> w @ jac
        tensor([0.5000, 1.5000], dtype=torch.float64)
    """

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        n, device = gn.shape[0], gn.device
        order = random_orders(self.generator(device), n, device)  # (n, n - 1)
        mask = present.to(gn.dtype)
        sq = gn.diagonal()
        inv_sq = torch.where(sq > ZERO_ROW / mask.sum().clamp_min(1), sq.reciprocal(), 0.0)
        # state[i] = [C_i | (C G)_i]; projecting g_i' off g_j adds -min(g_i' . g_j, 0) / |g_j|^2 [e_j | G_j]
        state = torch.cat([torch.diag(mask), gn], 1)
        updates = (torch.cat([torch.eye(n, dtype=gn.dtype, device=device), gn], 1) * inv_sq[:, None])[order]
        dots = (order + n).unsqueeze(-1)  # where g_i' . g_j is in state[i]
        for update, dot in zip(updates.unbind(1), dots.unbind(1)):
            state.addcmul_(state.gather(1, dot).clamp_max_(0.0), update, value=-1.0)
        return torch.where(finite, state[:, :n].sum(0), torch.nan)
