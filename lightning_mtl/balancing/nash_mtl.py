"""``nash_mtl``: the Nash bargaining solution among the tasks, ``G alpha = 1 / alpha``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import cho_solve, normalized_gram, presence
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

#: A task whose squared gradient norm is below this fraction of the mean is treated as zero (weight 0):
#: its Nash weight would be unbounded, and it moves the direction by nothing.
ZERO_ROW = 1e-12
#: Step sizes 1, 1/2, ... tried at once by the line search (the damped Newton step and 0 are added).
LINE_SEARCH = 8


@register_balancer("nash_mtl")
class NashMTL(GradientBalancer):
    """Nash-MTL: the weights ``alpha > 0`` with ``alpha_i (G alpha)_i = 1`` for every task, ``d = alpha @ J``.

    Navon et al., 2022, "Multi-Task Learning as a Bargaining Game" (ICML). ``alpha`` is the bargaining
    solution (``g_i . d = 1 / alpha_i``: the smaller a task's gradient, the larger its weight), and the
    direction does not depend on the scale of any single task's loss. As in the official trainer (and
    TorchJD's ``NashMTL``) the result is clipped to norm ``max_norm``; since ``|d|^2 = alpha^T G alpha = T``
    at the solution, the default ``max_norm=1`` makes ``d`` a unit vector. ``update_every`` (the official
    ``update_weights_every``) reuses the (clipped) weights in between.

    Solver: ``alpha`` minimises the strictly convex ``alpha^T G alpha / 2 - sum log alpha`` (whose gradient
    is ``G alpha - 1 / alpha``): ``newton_steps`` Newton steps with a line search over fixed step sizes
    (positivity kept), from the better of the previous step's ``alpha`` (kept in the ``alpha`` buffer, so it
    is checkpointed) and ``1 / |g_i|``, both rescaled to the optimal multiple. It reaches machine precision
    in 8 or fewer steps on random Jacobians with up to 32 tasks, where the official code solves up to 20
    convex programs with cvxpy. Zero gradients get weight 0, absent tasks too (their warm start is kept). When no solution exists (some non-negative
    combination of the gradients is 0: a Pareto-stationary point) ``alpha`` grows without bound and the
    clipped direction is that of the last iterate.

    Args:
        max_norm: clip ``|d|`` to this (0 disables it; the official default 1.0). With ``mode="features"``
            it clips the gradient of the shared representation, not of the parameters.
        newton_steps: Newton iterations per update (default 8).
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> nash = NashMTL(max_norm=0.0)
        >>> nash.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # |g_a| = 2, |g_b| = 1
        >>> nash.weights_from_gram(gram)  # each task's share of d has unit norm
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """

    alpha: Tensor

    def __init__(
        self,
        max_norm: float = 1.0,
        newton_steps: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not float(max_norm) >= 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0 (0 disables the clipping), got {max_norm}.")
        if int(newton_steps) < 1:
            raise ValueError(f"NashMTL: newton_steps must be >= 1, got {newton_steps}.")
        self.max_norm = float(max_norm)
        self.newton_steps = int(newton_steps)

    def setup(self, tasks: Sequence[Task]) -> None:  # type: ignore[override]
        super().setup(tasks)
        # The last solution (unclipped, in the gradients' units; 0 = none yet), the warm start of the next.
        self.register_buffer("alpha", torch.zeros(len(self.task_names), dtype=torch.float64))

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        if not hasattr(self, "alpha"):
            raise RuntimeError("NashMTL: call setup(tasks) first (MultiTaskModule does it).")
        present = presence(present, gram)
        gn, trace, finite = normalized_gram(gram, present)
        root = trace.sqrt().clamp_min(torch.finfo(gn.dtype).tiny)
        previous = self.alpha.to(gn)
        alpha = nash_bargaining(gn, previous * root, present, self.newton_steps) / root
        self.alpha.copy_(torch.where(present & finite, alpha, previous))  # absent tasks keep their warm start
        if self.max_norm > 0:  # |d| = sqrt(alpha^T G alpha), without forming d
            norm = ((alpha @ gn @ alpha) * trace).clamp_min(0).sqrt()
            alpha = alpha * (self.max_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)
        return torch.where(finite, alpha, torch.nan)


def nash_bargaining(gram: Tensor, warm: Tensor, present: Tensor, steps: int) -> Tensor:
    """``alpha > 0`` with ``alpha * (G alpha) = 1`` over the ``present`` tasks of a unit-trace ``gram`` (0 for
    zero gradients and absent tasks).

    ``warm``: a previous solution in the same units (entries <= 0 or non-finite are ignored).
    """
    n, dtype, device = gram.shape[0], gram.dtype, gram.device
    diag = gram.diagonal()
    count = present.sum()
    active = present & (diag > ZERO_ROW / count.clamp_min(1))
    eye = torch.eye(n, dtype=dtype, device=device)
    # zero gradients and absent tasks decouple (their alpha solves a = 1/a)
    g = torch.where(active[:, None] & active, gram, eye * ~active)
    cold = torch.where(active, diag, 1.0).rsqrt()
    warm = torch.where(active & torch.isfinite(warm) & (warm > 0), warm, cold)
    # The best multiple of each start over the present tasks (as the method on them alone takes it); the
    # absent ones stay at 1, a constant of the objective.
    starts = torch.stack([warm, cold]) * present
    starts = torch.where(present, starts * (count / ((starts @ g) * starts).sum(1, keepdim=True)).sqrt(), 1.0)
    alpha = starts.index_select(0, _objective(g, starts).argmin().view(1))[0]  # no host read
    # With one or two tasks the rescaled 1/|g_i| start is already the solution:
    # alpha_i = 1 / (|g_i| sqrt(1 + cos(g_1, g_2))).
    sizes = torch.cat([0.5 ** torch.arange(LINE_SEARCH, dtype=dtype, device=device), gram.new_zeros(2)])
    sizes, damped = sizes[:, None], sizes[-2:-1]
    for _ in range(steps if n > 2 else 0):
        inv = alpha.reciprocal()
        grad = torch.addmv(inv, g, alpha, beta=-1.0)  # G alpha - 1 / alpha
        factor = torch.linalg.cholesky_ex(torch.addcmul(g, eye, inv * inv))[0]
        newton = cho_solve(factor, grad[:, None])[:, 0]
        # The damped step 1 / (1 + decrement) always stays feasible (self-concordance); 0 keeps alpha.
        damped.copy_((grad @ newton).clamp_min_(0.0).sqrt_().add_(1.0).reciprocal_())
        candidates = torch.addcmul(alpha, sizes, newton, value=-1.0)
        f = _objective(g, candidates)
        # The longest step within rounding of the best value (near the optimum, f cannot tell them apart).
        fmin = f.min()
        best = (f <= fmin.abs().add_(1.0).mul_(1e-10).add_(fmin)).to(torch.int8).argmax()
        alpha = candidates.index_select(0, best.view(1))[0]
    return torch.where(active, alpha, 0.0)


def _objective(gram: Tensor, alphas: Tensor) -> Tensor:
    """``alpha^T G alpha / 2 - sum log alpha`` for each row, ``inf`` outside ``alpha > 0``."""
    f = torch.addcmul(alphas.log().neg_(), alphas @ gram, alphas, value=0.5).sum(-1)  # log(<0) = nan
    return torch.nan_to_num(f, nan=torch.inf, posinf=torch.inf)
