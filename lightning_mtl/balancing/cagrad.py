"""``cagrad``: the best worst-task improvement within a ball around the average gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import ENUMERATE_MAX, _supports, cho_solve, normalized_gram, presence
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

RESCALES = (0, 1, 2)
#: Ridge (relative to each task's squared gradient norm) that keeps the path's linear systems definite
#: when the task gradients are linearly dependent; it moves the solution by ~1e-12 relative.
RIDGE = 1e-12
#: Squared gradient norms below this fraction of the mean count as zero when scaling the tasks.
ZERO_ROW = 1e-12


@register_balancer("cagrad")
class CAGrad(GradientBalancer):
    """Conflict-averse gradient descent: ``d = argmax_{|d - g0| <= c |g0|} min_i g_i . d``.

    Liu et al., 2021, "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS), Algorithm 1:
    ``d = g0 + (c |g0| / |g_w|) g_w`` with ``g0`` the mean gradient and
    ``w = argmin_{w in simplex} g_w . g0 + c |g0| |g_w|``, i.e. weights ``1/T + c |g0| w / |g_w|``, the
    convention of TorchJD's ``CAGrad(c)`` (zero weights when ``|g_w| < norm_eps`` on the trace-normalised
    Gram, as TorchJD: a Pareto-stationary point; unlike TorchJD, not also whenever ``trace(G) < 1e-4``, an
    absolute threshold that would stop training with small gradients).

    Solver (exact, fixed work): with ``y = c |g0| w / |g_w|`` the optimality conditions read
    ``y >= 0``, ``G y + G 1/T - mu >= 0`` (complementary to ``y``) and ``y^T G y = c^2 |g0|^2``. On a
    support (the tasks with ``y > 0``) ``y`` is linear in ``mu`` and ``mu`` solves a quadratic: up to 10
    tasks every support is tried at once (one batched factorisation) and the one whose ``y`` satisfies the
    conditions wins. Beyond, the parametric linear complementarity problem is followed from ``y = 0``, one
    breakpoint (a task entering or leaving the support) per step (``y^T G y`` grows along it), and on the
    last piece ``mu`` solves the quadratic: :func:`path_steps` steps (``T + 2`` for ``c < 1``); if they run
    out, ``y`` is that of the last piece. Absent tasks take no part (weight 0; ``T`` is the number of
    present tasks).

    Args:
        c: radius of the ball, relative to ``|g0|`` (the paper's default for most experiments, 0.5).
        rescale: as the official code: ``0`` returns ``d`` (TorchJD's convention), ``1`` ``d / (1 + c^2)``
            (the official NYUv2 / Cityscapes setting), ``2`` ``d / (1 + c)``.
        norm_eps: below this ``|g_w|``, relative to the Frobenius norm of ``J``, the weights are zero.
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> gram = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
        >>> CAGrad(c=0.5).weights_from_gram(gram)  # symmetric tasks: d = (1 + c) g0
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    def __init__(
        self,
        c: float = 0.5,
        rescale: int = 0,
        norm_eps: float = 1e-4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not float(c) >= 0:
            raise ValueError(f"CAGrad: c must be >= 0 (the paper uses 0.5; 0 is the mean gradient), got {c}.")
        if rescale not in RESCALES:
            raise ValueError(
                f"CAGrad: rescale must be one of {RESCALES} (0: d, 1: d / (1 + c^2), 2: d / (1 + c)), got {rescale!r}."
            )
        if not float(norm_eps) >= 0:
            raise ValueError(f"CAGrad: norm_eps must be >= 0, got {norm_eps}.")
        self.c = float(c)
        self.rescale = int(rescale)
        self.norm_eps = float(norm_eps)

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        share = present.to(gn.dtype)
        share = share / share.sum().clamp_min(1)  # 1/K on each of the K present tasks
        b = gn @ share  # each task's dot with the mean gradient g0
        radius2 = (b @ share).clamp_min(0) * self.c**2  # (c |g0|)^2
        y = conflict_averse_solution(gn, b, share, radius2, path_steps(gn.shape[0], self.c))
        # |g_w| = c |g0| / sum(y): TorchJD returns zeros below norm_eps (written without a division);
        # with c |g0| = 0 the direction is g0 (y = 0 up to rounding).
        radius = radius2.sqrt()
        weights = (share + torch.where(radius > 0, y, 0.0)) * (
            (radius >= self.norm_eps * y.sum()) | (radius == 0)
        )
        if self.rescale:
            weights = weights / (1.0, 1 + self.c**2, 1 + self.c)[self.rescale]
        return torch.where(finite, weights, torch.nan)


def path_steps(n: int, c: float) -> int:
    """Steps of :func:`conflict_averse_path`: one per breakpoint, plus the last piece.

    Two tasks have at most 2 breakpoints (the second task enters, the first may leave for good). Beyond,
    a path has ``n - 1`` breakpoints unless tasks leave and re-enter: over thousands of random Jacobians
    (ranks 2 to ``n``, duplicated rows, norms over 4 decades, ``n <= 32``) that added at most one with
    ``c < 1``, and up to ``n // 4`` with ``c >= 1`` (a ball reaching Pareto-stationary directions).
    """
    if n <= 2:
        return n + 1
    return n + 2 + (n // 2 if c >= 1 else 0)


def conflict_averse_solution(gram: Tensor, b: Tensor, share: Tensor, radius2: Tensor, steps: int) -> Tensor:
    """``y >= 0`` with ``G y + b - mu 1 >= 0``, complementary to ``y``, and ``y^T G y = radius2``, over the
    tasks where ``share`` (``1/K`` on the ``K`` present tasks) is positive (0 elsewhere).

    ``gram``: unit-trace ``T x T``; ``b``: ``G share``. On a support ``S``, ``y_S = mu p - q`` with
    ``G_SS p = 1``, ``G_SS q = b_S``, and ``y^T G y = a mu^2 - 2 beta mu + gamma`` (``a = 1.p``,
    ``beta = 1.q``, ``gamma = b.q``) reaches ``radius2`` at the larger root. Up to
    :data:`~lightning_mtl.balancing._solvers.ENUMERATE_MAX` tasks every support is tried at once (one batched
    factorisation) and the one whose ``y`` satisfies the conditions wins; beyond,
    :func:`conflict_averse_path` follows the solution from ``y = 0``. Computed on the tasks rescaled to unit
    gradients (``y = D u``), where the ridge is relative to every task's own scale.
    """
    n, dtype, device = gram.shape[0], gram.dtype, gram.device
    # y = D u with D = diag(G)^-1/2: the same conditions on u with D G D (unit diagonal), D b and D 1.
    unit = torch.maximum(gram.diagonal(), share.amax() * ZERO_ROW).rsqrt()
    matrix = gram * torch.outer(unit, unit)
    matrix.diagonal().add_(RIDGE)
    ones, dot = unit * (share > 0), unit * b  # D 1 (0 for the absent tasks) and D b
    rhs_t = torch.stack([ones, dot])  # (2, n): p and q solve M_SS [p q] = [D 1, D b]_S
    if n > ENUMERATE_MAX:
        return conflict_averse_path(matrix, rhs_t, b, share > 0, radius2, steps).clamp_min(0) * unit
    neg_mask, outer, off = _supports(n, device, dtype)
    factor = torch.linalg.cholesky_ex(torch.addcmul(off, matrix, outer))[0]
    pq = cho_solve(factor, neg_mask * rhs_t.mT)  # (2^n, n, 2): -[p q] on each support, 0 off it
    a, beta, _, gamma = (rhs_t @ pq).flatten(1).neg_().unbind(1)  # D1.p, D1.q, Db.p, Db.q
    mu = torch.addcmul(beta * beta, a, gamma - radius2, value=-1.0).clamp_min_(0.0).sqrt_().add_(beta) / a
    minus_p, minus_q = pq.unbind(-1)
    u = torch.addcmul(minus_q, mu[:, None], minus_p, value=-1.0)  # mu p - q
    slack = torch.addr(torch.addmm(dot, u, matrix), mu, ones, alpha=-1.0)  # D (G y + b - mu 1)
    residual = torch.linalg.vector_norm(torch.minimum(u, slack), ord=torch.inf, dim=1)
    residual = residual / torch.linalg.vector_norm(u, ord=torch.inf, dim=1).add_(1)
    best = torch.nan_to_num(residual, nan=torch.inf).argmin().view(1)
    return u.index_select(0, best)[0].clamp_min(0) * unit  # no host read


def conflict_averse_path(
    matrix: Tensor, rhs_t: Tensor, b: Tensor, present: Tensor, radius2: Tensor, steps: int
) -> Tensor:
    """The ``u`` of :func:`conflict_averse_solution` by path following, for ``M = D G D + ridge``,
    ``rhs_t = [D 1, D b]`` (``2 x T``), ``b`` and the present tasks (bool).

    Follows ``u(mu)`` for increasing ``mu`` from ``mu = min(b)`` over the present tasks (where ``u = 0``):
    a task leaves when its ``u`` reaches 0 and enters when its slack does (an absent task, whose ``D 1`` is
    0, never does). Returns ``u`` once ``u^T M u`` reaches ``radius2`` (the last piece's quadratic in ``mu``),
    or that of the last piece when the steps run out.
    """
    n, dtype, device = matrix.shape[0], matrix.dtype, matrix.device
    eye = torch.eye(n, dtype=dtype, device=device)
    inf = torch.full((), torch.inf, dtype=dtype, device=device)
    positions = torch.arange(n, device=device)
    b = torch.where(present, b, inf)
    support = positions == b.argmin()
    others = ~support  # not the task that changed last, which cannot change again at the same mu
    mu, done = b.min(), torch.zeros((), dtype=torch.bool, device=device)
    rhs = rhs_t.mT
    for _ in range(steps):
        column = support[:, None]
        factor = torch.linalg.cholesky_ex(torch.where(column & support, matrix, eye))[0]
        pq = cho_solve(factor, torch.where(column, rhs, 0.0))
        a, beta, _, gamma = (rhs_t @ pq).flatten().unbind()  # D1.p, D1.q, Db.p, Db.q
        # u^T M u = u_S . (mu D 1 - D b)_S = a mu^2 - 2 beta mu + gamma on this piece: its larger root.
        disc = torch.addcmul(beta * beta, a, gamma - radius2, value=-1.0)
        target = disc.clamp_min_(0.0).sqrt_().add_(beta) / a
        # On the support u_j = mu p_j - q_j leaves at q_j / p_j if p_j < 0; off it the (scaled) slack
        # (D b - M q)_j - (D 1 - M p)_j mu enters at the ratio if (D 1 - M p)_j > 0.
        rate, offset = torch.where(column, pq, rhs - matrix @ pq).unbind(1)
        ratio = offset / rate
        valid = ((rate > 0) != support) & (ratio >= mu) & others
        next_mu, j = torch.where(valid, ratio, inf).min(0)
        piece = (mu, target, pq)  # u on this piece, at the larger of mu and its root
        finish = done | (target <= next_mu)
        others = (positions != j) | finish
        support = support == others  # task j flips, unless finished
        mu = torch.where(finish, mu, next_mu)
        done = finish
    start, target, pq = piece  # once done, the support and mu stay: the last piece is the final one
    p, q = pq.unbind(1)
    return torch.addcmul(-q, start.maximum(target), p)
