"""``imtl``: IMTL-G, the combination whose projections onto every unit task gradient are equal."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer


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
    gradients (``|g_t|^2 <= 1e-12 * mean |g|^2``) get weight 0; if no combination sums to a non-zero
    total, all weights are 0. The weights are divided by ``|sum_t w_t|``, not ``sum_t w_t``: when the sum
    is negative (it happens with three or more tasks of very different norms) the paper's normalisation,
    and TorchJD's, flips ``d`` into an ascent direction for every task (equal *negative* projections).
    Otherwise identical to TorchJD's ``pinv(G) @ |g|``, except for linearly dependent gradients.

    No hyper-parameters (the paper has none for IMTL-G); ``mode``, ``update_every``, ``jacobian``,
    ``memory_budget_mb``, ``seed``: see :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> w = IMTLG().weights_from_gram(jac @ jac.T, ["a", "b"])
        >>> w  # d = (0.75, 0.75): the same projection 0.75 on both unit gradients
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """

    def weights_from_gram(self, gram: Tensor, names: Sequence[str]) -> Tensor:
        n, dtype = gram.shape[0], gram.dtype
        sq = gram.diagonal()
        floor = 1e-12 * sq.sum() / n + torch.finfo(dtype).tiny
        valid = sq > floor
        inv_norm = torch.where(valid, sq.clamp_min(floor).rsqrt(), 0.0)
        cos = inv_norm[:, None] * gram * inv_norm[None, :]
        reg = cos @ cos
        reg.diagonal().add_(1e-12)
        a = torch.linalg.solve_ex(reg, cos @ valid.to(dtype))[0]  # no host synchronisation, unlike pinv
        w = a * inv_norm
        total = w.sum()
        ok = total.abs() > 1e-12 * w.abs().sum()
        return torch.where(ok, w / torch.where(ok, total.abs(), 1.0), 0.0)
