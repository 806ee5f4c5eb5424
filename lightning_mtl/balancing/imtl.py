"""``imtl``: IMTL-G, the combination whose projections onto every unit task gradient are equal."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import cho_solve, normalized_gram, presence
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

#: Squared gradient norms below this fraction of the mean count as zero (weight 0).
ZERO_ROW = 1e-12


@register_balancer("imtl")
class IMTLG(GradientBalancer):
    """Impartial MTL (gradient part): ``d = w @ J`` with ``sum_t w_t = 1`` and ``d . u_t`` the same for every
    unit gradient ``u_t = g_t / |g_t|``, so no task is favoured.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, 2021, "Towards Impartial Multi-task Learning" (ICLR).
    With ``C_ij = u_i . u_j = G_ij / (|g_i| |g_j|)``, equal projections read ``C a = 1`` for
    ``d = sum_t a_t u_t``; then ``w_t = a_t / |g_t|``, normalised to sum 1 (the paper's closed form
    ``alpha = g_1 U^T (D U^T)^-1`` is the same solution for independent gradients).

    Singular cases (parallel or dependent gradients, ``-g`` pairs) take the least-squares solution of
    ``C a = 1``, computed as ``(C^2 + r^2 I)^-1 C 1`` with ``r = 1e-6`` (a pseudo-inverse that ignores
    directions of ``C`` with eigenvalue << 1e-6, without an SVD and its host synchronisation). Zero
    gradients (``|g_t|^2 <= 1e-12 * mean |g|^2``) and absent tasks get weight 0; if no combination sums to a non-zero
    total, all weights are 0. The weights are divided by ``|sum_t w_t|``, not ``sum_t w_t``: when the sum
    is negative (it happens with three or more tasks of very different norms) the paper's normalisation,
    and TorchJD's, flips ``d`` into an ascent direction for every task (equal *negative* projections).
    Otherwise identical to TorchJD's ``pinv(G) @ |g|``, except for linearly dependent gradients.

    No hyper-parameters (the paper has none for IMTL-G); ``mode``, ``update_every``, ``jacobian``,
    ``memory_budget_mb``, ``seed``: see :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> w = IMTLG().weights_from_gram(jac @ jac.T)
        >>> w  # d = (0.75, 0.75): the same projection 0.75 on both unit gradients
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        n, dtype = gn.shape[0], gn.dtype
        sq = gn.diagonal()
        valid = sq > ZERO_ROW / present.sum().clamp_min(1)  # absent tasks have sq = 0
        inv_norm = torch.where(valid, sq.rsqrt(), 0.0)
        cos = inv_norm[:, None] * gn * inv_norm
        # (C^2 + r^2 I)^-1 C 1 by Cholesky (torch.linalg.solve checks its result on the host, a sync)
        reg = torch.addmm(torch.eye(n, dtype=dtype, device=gn.device), cos, cos, beta=1e-12)
        a = cho_solve(torch.linalg.cholesky_ex(reg)[0], cos.sum(1, keepdim=True))[:, 0]  # C 1
        w = a * inv_norm
        total = w.sum()
        ok = total.abs() > 1e-12 * w.abs().sum()
        w = torch.where(ok, w / torch.where(ok, total.abs(), 1.0), 0.0)
        return torch.where(finite, w, torch.nan)
