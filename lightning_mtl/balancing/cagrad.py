"""``cagrad``: the best worst-task improvement within a ball around the average gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import cho_solve, normalized_gram
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
    ``y >= 0``, ``G y + G 1/T - mu >= 0`` (complementary to ``y``) and ``y^T G y = c^2 |g0|^2``. For a given
    ``mu`` the first two define a parametric linear complementarity problem whose solution is piecewise
    linear in ``mu``, and ``y^T G y`` grows along it: the path is followed from ``y = 0`` one breakpoint
    (a task entering or leaving the support) per step, and on the last piece ``mu`` solves a quadratic.
    :func:`path_steps` steps (``T + 2`` for ``c < 1``); if they run out, ``y`` is that of the last piece.

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
        >>> CAGrad(c=0.5).weights_from_gram(gram, ["a", "b"])  # symmetric tasks: d = (1 + c) g0
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    def __init__(
        self,
        c: float = 0.5,
        rescale: int = 0,
        norm_eps: float = 1e-4,
        mode: str = "params",
        update_every: int = 1,
        jacobian: str = "loop",
        memory_budget_mb: float = 2048.0,
        seed: int = 0,
    ) -> None:
        super().__init__(mode, update_every, jacobian, memory_budget_mb, seed)
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

    def weights_from_gram(self, gram: Tensor, names: Sequence[str]) -> Tensor:
        gn, _, finite = normalized_gram(gram)
        n = gn.shape[0]
        radius2 = self.c**2 * gn.sum().clamp_min(0) / n**2  # (c |g0|)^2, g0 the mean gradient
        y = conflict_averse_path(gn, gn.mean(1), radius2, path_steps(n, self.c))
        # |g_w| = c |g0| / sum(y): TorchJD returns zeros below norm_eps (written without a division);
        # with c |g0| = 0 the direction is g0 (y = 0 up to rounding).
        radius = radius2.sqrt()
        weights = (1.0 / n + y * (radius > 0)) * ((radius >= self.norm_eps * y.sum()) | (radius == 0))
        weights = weights / (1.0, 1 + self.c**2, 1 + self.c)[self.rescale]
        return torch.where(finite, weights, torch.full_like(weights, torch.nan))


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


def conflict_averse_path(gram: Tensor, b: Tensor, radius2: Tensor, steps: int) -> Tensor:
    """``y >= 0`` with ``G y + b - mu >= 0``, complementary to ``y``, and ``y^T G y = radius2``.

    ``gram``: unit-trace ``T x T``; ``b``: ``G 1/T``. Follows ``y(mu)`` for increasing ``mu`` from
    ``mu = min(b)`` (where ``y = 0``): on a support ``S``, ``y_S = mu p - q`` with ``G_SS p = 1``,
    ``G_SS q = b_S``; a task leaves when its ``y`` reaches 0 and enters when its slack ``(G y + b - mu)``
    does. Returns ``y`` once ``y^T G y`` reaches ``radius2`` (the last piece's quadratic in ``mu``).
    Computed on the tasks rescaled to unit gradients (``y = D u``), the same path.
    """
    n, dtype, device = gram.shape[0], gram.dtype, gram.device
    eye = torch.eye(n, dtype=dtype, device=device)
    # y = D u with D = diag(G)^-1/2: the same conditions on u with D G D (unit diagonal, so the ridge is
    # relative to every task's own scale), D b and D 1 in place of G, b and 1.
    unit = gram.diagonal().clamp_min(ZERO_ROW / n).rsqrt()
    matrix = gram * unit[:, None] * unit + RIDGE * eye
    rhs = torch.stack([unit, unit * b], 1)  # (n, 2): p and q solve M_SS [p q] = [D 1, D b]_S
    inf = torch.full((), torch.inf, dtype=dtype, device=device)
    positions = torch.arange(n, device=device)
    support = positions == b.argmin()
    last = support  # the task that changed last cannot change again at the same mu
    mu, done, u = b.min(), torch.zeros((), dtype=torch.bool, device=device), torch.zeros_like(b)
    for _ in range(steps):
        factor = torch.linalg.cholesky_ex(torch.where(support[:, None] & support, matrix, eye))[0]
        pq = cho_solve(factor, torch.where(support[:, None], rhs, 0))
        a, beta, _, gamma = (rhs.T @ pq).flatten().unbind()  # D1.p, D1.q, Db.p, Db.q
        # u^T M u = u_S . (mu D 1 - D b)_S = a mu^2 - 2 beta mu + gamma on this piece: its larger root.
        target = (beta + (beta * beta - a * (gamma - radius2)).clamp_min(0).sqrt()) / a
        # On the support u_j = mu p_j - q_j leaves at q_j / p_j if p_j < 0; off it the (scaled) slack
        # (D b - M q)_j - (D 1 - M p)_j mu enters at the ratio if (D 1 - M p)_j > 0.
        rate, offset = torch.where(support[:, None], pq, rhs - matrix @ pq).unbind(1)
        ratio = offset / rate
        valid = (torch.where(support, -rate, rate) > 0) & (ratio >= mu) & ~last
        next_mu, j = torch.where(valid, ratio, inf).min(0)
        finish = done | (target <= next_mu)
        p, q = pq.unbind(1)
        u = torch.where(done, u, mu.maximum(target) * p - q)
        last = (positions == j) & ~finish
        support = support ^ last
        mu = torch.where(finish, mu, next_mu)
        done = finish
    return u.clamp_min(0) * unit
